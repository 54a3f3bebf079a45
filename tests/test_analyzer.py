"""student_data_analyzer.py: numbers equal hand-computed ones; every left-out id is reported; bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atkd.io import write_jsonl
from atkd.tree import load_tree

# Med
# ├── Internal
# │   ├── Cardio
# │   ├── Resp
# │   └── Neuro        (no questions)
# └── Surgery
#     └── Ortho
TREE = {"Med": {"综合得分": 0.3, "Internal": {"Cardio": 0, "Resp": None, "Neuro": {}}, "Surgery": {"Ortho": 0}}}


def q(i, answer):
    return {"id": i, "question": f"Question {i}?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
            "answer_idx": answer, "meta_info": ""}


QUESTIONS = [q(1, "A"), q(2, "B"), q(3, "C"), q(4, "A"), q(5, "D"), q(6, "B"), q(7, "C"), q(8, "A"),
             q(9, "B"), q(10, "A"), q(11, "B")]
PATHS = [
    {"id": 1, "ability_path": ["Med", "Internal", "Cardio"]},
    {"id": 2, "ability_path": ["Med", "Internal", "Cardio"]},
    {"id": 3, "ability_path": ["Internal", "Cardio"]},         # without the root: same node
    {"id": 4, "ability_path": ["Med", "Internal", "Resp"]},
    {"id": 5, "ability_path": ["Med", "Internal"]},            # names an inner node
    {"id": 6, "ability_path": ["Surgery", "Ortho"]},
    {"id": 7, "ability_path": ["Med", "Surgery", "Trauma"]},   # matches nothing
    {"id": 8, "ability_path": ["Med", "Internal", "Cardio"]},  # has no reply
    # id 9 has no ability path
    {"id": "10", "ability_path": ["Med", "Surgery", "Ortho"]},  # "10" == 10: ids compare as strings
    {"id": 11, "ability_path": ["Med", "Internal", "Resp"]},
    {"id": 99, "ability_path": ["Med", "Internal", "Resp"]},   # not in the answers file
]
REPLIES = [
    {"id": 1, "pred_letter": "A", "correct": True},
    {"id": 2, "pred_letter": "C", "correct": False},
    {"id": 3, "pred_letter": "C", "correct": True},
    {"id": 4, "pred_letter": None, "correct": False},  # unparsed: wrong
    {"id": 5, "pred_letter": "D", "correct": True},
    {"id": 6, "pred_letter": "A", "correct": True},    # field disagrees: recomputed (wrong) wins
    {"id": 7, "pred_letter": "C", "correct": True},
    {"id": 9, "pred_letter": "B", "correct": True},
    {"id": 10, "pred_letter": "B", "correct": False},
    {"id": 11, "pred_letter": "Z", "correct": False},  # not an option of the item: wrong
    {"id": 77, "pred_letter": "A", "correct": True},   # unknown id
]


def write_inputs(folder: Path, tree=TREE, questions=QUESTIONS, paths=PATHS, replies=REPLIES) -> dict:
    files = {"tree": folder / "tree_in.json", "paths": folder / "paths.jsonl", "answers": folder / "q.jsonl",
             "replies": folder / "replies.jsonl"}
    files["tree"].write_text(json.dumps(tree, ensure_ascii=False), encoding="utf-8")
    write_jsonl(files["paths"], paths)
    write_jsonl(files["answers"], questions)
    write_jsonl(files["replies"], replies)
    return files


def analyzer_args(files: dict, out: Path, *extra) -> list:
    return ["--initial_tree_path", files["tree"], "--paths_file", files["paths"], "--answers_file", files["answers"],
            "--student_responses_file", files["replies"], "--output_tree_path", out / "tree.json",
            "--output_stats_path", out / "stats.json", *extra]


def test_numbers_equal_hand_computed(tmp_path, run):
    files = write_inputs(tmp_path)
    res = run("student_data_analyzer.py", *analyzer_args(files, tmp_path / "out", "--prior_strength", "2"))
    assert res.returncode == 0, res.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    by_path = {" > ".join(n["path"]): n for n in stats["nodes"]}

    # Counted (answered, path matches): 1 ✓, 2 ✗, 3 ✓ (Cardio); 4 ✗, 11 ✗ (Resp); 5 ✓ (Internal itself);
    # 6 ✗, 10 ✗ (Ortho). Not counted: 7 (unmatched path), 8 (no reply), 9 (no path).
    counts = {"Med": (8, 3), "Med > Internal": (6, 3), "Med > Internal > Cardio": (3, 2),
              "Med > Internal > Resp": (2, 0), "Med > Internal > Neuro": (0, 0),
              "Med > Surgery": (2, 0), "Med > Surgery > Ortho": (2, 0)}
    assert {p: (n["n"], n["correct"]) for p, n in by_path.items()} == counts

    # s = 2; smoothed = (correct + s * parent_smoothed) / (n + s), the root's parent is 0.5.
    med = (3 + 2 * 0.5) / (8 + 2)                  # 4/10     = 0.4
    internal = (3 + 2 * med) / (6 + 2)             # 3.8/8    = 0.475
    cardio = (2 + 2 * internal) / (3 + 2)          # 2.95/5   = 0.59
    resp = (0 + 2 * internal) / (2 + 2)            # 0.95/4   = 0.2375
    neuro = internal                               # n = 0: the parent's value, 0.475
    surgery = (0 + 2 * med) / (2 + 2)              # 0.8/4    = 0.2
    ortho = (0 + 2 * surgery) / (2 + 2)            # 0.4/4    = 0.1
    assert (med, internal, cardio, resp, neuro, surgery, ortho) == pytest.approx(
        (0.4, 0.475, 0.59, 0.2375, 0.475, 0.2, 0.1))
    expected = {"Med": (0.4, 3 / 8), "Med > Internal": (0.475, 3 / 6), "Med > Internal > Cardio": (0.59, 2 / 3),
                "Med > Internal > Resp": (0.2375, 0.0), "Med > Internal > Neuro": (0.475, None),
                "Med > Surgery": (0.2, 0.0), "Med > Surgery > Ortho": (0.1, 0.0)}
    for path, (smoothed, raw) in expected.items():
        node = by_path[path]
        assert node["smoothed_accuracy"] == pytest.approx(smoothed), path
        assert node["weakness"] == pytest.approx(1 - smoothed), path
        assert node["accuracy"] == (None if raw is None else pytest.approx(raw)), path

    # Weakest first: Ortho 0.9, Resp 0.7625, Neuro 0.525, Cardio 0.41.
    assert [" > ".join(n["path"]) for n in stats["leaves_weakest_first"]] == [
        "Med > Surgery > Ortho", "Med > Internal > Resp", "Med > Internal > Neuro", "Med > Internal > Cardio"]
    assert stats["scored"] == 8 and stats["correct"] == 3

    assert stats["unmatched_paths"] == [{"path": ["Med", "Surgery", "Trauma"], "count": 1, "example_ids": ["7"]}]
    reported = {k: stats[k]["example_ids"] for k in ("questions_without_reply", "questions_without_path",
                                                      "path_ids_not_in_answers", "replies_for_unknown_ids",
                                                      "unparsed_replies", "letters_not_in_options",
                                                      "correct_field_disagrees")}
    assert reported == {"questions_without_reply": ["8"], "questions_without_path": ["9"],
                        "path_ids_not_in_answers": ["99"], "replies_for_unknown_ids": ["77"],
                        "unparsed_replies": ["4"], "letters_not_in_options": ["11"],
                        "correct_field_disagrees": ["6"]}
    for key, count in (("questions_without_reply", 1), ("replies_for_unknown_ids", 1)):
        assert stats[key]["count"] == count
    # Each count is also a warning in the log.
    for text in ("1 questions in the answers file with no reply", "1 replies whose id the answers file does not have",
                 "unmatched path Med > Surgery > Trauma: 1 questions", "1 ids in the paths file"):
        assert text in res.stderr, text

    # The scored tree holds the same numbers and loads back.
    tree = load_tree(tmp_path / "out" / "tree.json")
    assert tree.domain == "Med"
    resp_node = tree.node(("Med", "Internal", "Resp"))
    assert (resp_node.stats["n"], resp_node.stats["correct"]) == (2, 0)
    assert resp_node.stats["smoothed_accuracy"] == pytest.approx(0.2375)
    # The done-record beside the outputs holds the command line and the fingerprint of the run.
    record = json.loads((tmp_path / "out" / "analyze.done.json").read_text(encoding="utf-8"))
    assert record["argv"][record["argv"].index("--prior_strength") + 1] == "2.0"
    assert record["fingerprint"]["prior_strength"] == 2.0 and record["fingerprint"]["stage"] == "AnalyzerConfig"
    assert not list((tmp_path / "out").glob("*.args.json"))


def test_default_prior_and_flat_tree_root_inferred(tmp_path, run):
    """A tree file listing level-1 nodes directly is rooted at the paths' shared first element."""
    flat = {"Internal": {"Cardio": 0, "Resp": 0}, "Surgery": 0}
    paths = [{"id": 1, "ability_path": ["Med", "Internal", "Cardio"]}, {"id": 2, "ability_path": ["Med", "Surgery"]}]
    replies = [{"id": 1, "pred_letter": "A", "correct": True}, {"id": 2, "pred_letter": "A", "correct": False}]
    files = write_inputs(tmp_path, tree=flat, questions=[q(1, "A"), q(2, "B")], paths=paths, replies=replies)
    res = run("student_data_analyzer.py", *analyzer_args(files, tmp_path))
    assert res.returncode == 0, res.stderr
    stats = json.loads((tmp_path / "stats.json").read_text(encoding="utf-8"))
    assert stats["domain"] == "Med" and stats["prior_strength"] == 4.0
    by_path = {" > ".join(n["path"]): n for n in stats["nodes"]}
    # s = 4: root (1 + 4*0.5)/(2 + 4) = 3/6 = 0.5; Internal (1 + 4*0.5)/(1 + 4) = 3/5 = 0.6;
    # Cardio (1 + 4*0.6)/(1 + 4) = 3.4/5 = 0.68; Surgery (0 + 4*0.5)/(1 + 4) = 2/5 = 0.4; Resp n=0: 0.6.
    assert by_path["Med"]["smoothed_accuracy"] == pytest.approx(0.5)
    assert by_path["Med > Internal"]["smoothed_accuracy"] == pytest.approx(0.6)
    assert by_path["Med > Internal > Cardio"]["smoothed_accuracy"] == pytest.approx(0.68)
    assert by_path["Med > Surgery"]["smoothed_accuracy"] == pytest.approx(0.4)
    assert by_path["Med > Internal > Resp"]["smoothed_accuracy"] == pytest.approx(0.6)
    assert stats["unmatched_paths"] == []


def test_every_node_carries_its_wilson_interval_and_the_per_question_results(tmp_path, run):
    files = write_inputs(tmp_path)
    res = run("student_data_analyzer.py", *analyzer_args(files, tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text(encoding="utf-8"))
    by_path = {" > ".join(n["path"]): n for n in stats["nodes"]}
    # Wilson, z = 1.959964 (z^2 = 3.841459), by hand:
    # Cardio 2/3: centre = (2/3 + z^2/6) / (1 + z^2/3) = 1.306910 / 2.280486 = 0.573084,
    #   half = z / 2.280486 * sqrt(2/9/3 + z^2/36) = 0.859450 * 0.425184 = 0.365424 -> [0.2077, 0.9385]
    # Resp 0/2: centre = half = (z^2/4) / (1 + z^2/2) = 0.960365 / 2.920730 = 0.328808 -> [0, 0.6576]
    # Med 3/8: centre = (0.375 + z^2/16) / (1 + z^2/8) = 0.615091 / 1.480182 = 0.415552,
    #   half = z / 1.480182 * sqrt(0.375 * 0.625 / 8 + z^2/256) = 1.324138 * 0.210483 = 0.278709 -> [0.1368, 0.6943]
    assert by_path["Med > Internal > Cardio"]["ci95"] == pytest.approx([0.2077, 0.9385], abs=1e-4)
    assert by_path["Med > Internal > Resp"]["ci95"] == pytest.approx([0.0, 0.6576], abs=1e-4)
    assert by_path["Med"]["ci95"] == pytest.approx([0.1368, 0.6943], abs=1e-4) == stats["ci95"]
    assert by_path["Med > Internal > Neuro"]["ci95"] is None  # n = 0: nothing measured
    leaves = {" > ".join(n["path"]): n["ci95"] for n in stats["leaves_weakest_first"]}
    assert leaves["Med > Internal > Cardio"] == by_path["Med > Internal > Cardio"]["ci95"]
    # The smoothed accuracy (s = 4) shrinks Cardio toward its parent; the raw interval describes 2/3.
    assert by_path["Med > Internal > Cardio"]["smoothed_accuracy"] < 2 / 3
    # Each counted question, at the node it counted at, right or wrong as recomputed (id 6's field said true).
    assert stats["per_question"] == [
        {"id": "1", "path": ["Med", "Internal", "Cardio"], "correct": True},
        {"id": "2", "path": ["Med", "Internal", "Cardio"], "correct": False},
        {"id": "3", "path": ["Med", "Internal", "Cardio"], "correct": True},
        {"id": "4", "path": ["Med", "Internal", "Resp"], "correct": False},
        {"id": "5", "path": ["Med", "Internal"], "correct": True},
        {"id": "6", "path": ["Med", "Surgery", "Ortho"], "correct": False},
        {"id": "10", "path": ["Med", "Surgery", "Ortho"], "correct": False},
        {"id": "11", "path": ["Med", "Internal", "Resp"], "correct": False}]


BAD = {
    "unparsable line": ("replies", '{"id": 1, "pred_letter": "A", "correct": true}\n{"id": 2,\n', 2, "not valid JSON"),
    "missing field": ("paths", '{"id": 1, "ability_path": ["Med", "Internal", "Cardio"]}\n{"id": 2}\n', 2,
                      '"ability_path"'),
    "duplicate id": ("replies", '{"id": 1, "pred_letter": "A", "correct": true}\n'
                                '{"id": "1", "pred_letter": "B", "correct": false}\n', 2, "duplicate id"),
    "answer not among options": ("answers", json.dumps({**q(1, "A"), "answer_idx": "E"}) + "\n", 1,
                                 "not among the options"),
    "empty file": ("replies", "\n", None, "empty"),
    "no path matches the tree": ("paths", '{"id": 1, "ability_path": ["Law", "Torts"]}\n', 1,
                                 "no ability path matches"),
    "pred_letter not a letter": ("replies", '{"id": 1, "pred_letter": 3, "correct": true}\n', 1, '"pred_letter"'),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_naming_file_and_line(tmp_path, run, case):
    which, text, line, problem = BAD[case]
    files = write_inputs(tmp_path)
    files[which].write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    res = run("student_data_analyzer.py", *analyzer_args(files, out))
    assert res.returncode == 2, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    where = f"{files[which]}:{line}:" if line else f"{files[which]}:"
    assert last.startswith(f"error: {where}") and problem in last, last
    assert "Traceback" not in res.stderr
    assert not out.exists() or not any(out.iterdir())


def test_help(run):
    res = run("student_data_analyzer.py", "--help")
    assert res.returncode == 0 and "--prior_strength" in res.stdout
