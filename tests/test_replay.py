"""Replay (step D2): a set share of the training items comes from the round's own questions, with their
gold answers, drawn in favour of the abilities the student already answers well; seeded and recorded.
The share is of the final training items (D2 runs after D3's drops), its count the nearest share."""

from __future__ import annotations

import json

from conftest import make_questions

from atkd import paths
from atkd.io import iter_jsonl, write_jsonl
from atkd.replay import replay_count
from atkd.tree import tree_from_nested
from test_rationales import OPTS, items, teacher  # noqa: F401  (teacher: the scripted teacher fixture)


def read_jsonl(path):
    return [obj for _, obj in iter_jsonl(path)]


def scored_tree(path, smoothed: dict[str, float]) -> None:
    """A scored tree Root > Area > {Known, Weak} with these smoothed accuracies (as step B writes them)."""
    tree = tree_from_nested({"Area": {"Known": 0, "Weak": 0}}, domain="Root")
    for node in tree.nodes():
        acc = smoothed.get(node.name, 0.5)
        node.stats = {"n": 10, "correct": round(10 * acc), "accuracy": acc, "smoothed_accuracy": acc,
                      "weakness": 1 - acc}
    tree.save_scored(path)


def inputs(tmp_path, n_generated=30, n_per_leaf=20):
    generated = make_questions(n_generated, seed=2, id_prefix="it1-")
    dataset = make_questions(2 * n_per_leaf, seed=3, id_prefix="q")
    write_jsonl(tmp_path / "validated.jsonl", generated)
    write_jsonl(tmp_path / "data.jsonl", dataset)
    write_jsonl(tmp_path / "paths.jsonl", [{"id": q["id"], "ability_path": ["Area", "Known" if i % 2 else "Weak"]}
                                           for i, q in enumerate(dataset)])
    scored_tree(tmp_path / "tree.json", {"Known": 0.95, "Weak": 0.05})
    return generated, {q["id"]: q for q in dataset}


def replay(run, tmp_path, out, *extra):
    res = run("add_replay.py", "--validated_file", tmp_path / "validated.jsonl", "--dataset_path",
              tmp_path / "data.jsonl", "--ability_class_path", tmp_path / "paths.jsonl", "--ability_tree_path",
              tmp_path / "tree.json", "--output_path", out, *extra)
    assert res.returncode == 0, res.stderr
    return read_jsonl(out)


def test_replay_items_make_the_set_share_with_gold_answers_favouring_known_abilities(tmp_path, run):
    generated, dataset = inputs(tmp_path)
    out = tmp_path / "D2" / "train.jsonl"
    mix = replay(run, tmp_path, out, "--replay_fraction", "0.25", "--seed", "3")
    assert [r["id"] for r in mix[:30]] == [q["id"] for q in generated]  # every validated item, first
    replayed = mix[30:]
    assert len(replayed) == replay_count(30, 0.25) == 10  # 10 of 40 training items: a quarter
    for r in replayed:
        original = dataset[r["replay_of"]]
        assert r["id"] == f"replay-{original['id']}" and r["source"] == "replay"
        assert (r["question"], r["options"], r["answer_idx"]) == (original["question"], original["options"],
                                                                   original["answer_idx"])
    known = sum(r["ability_path"] == ["Root", "Area", "Known"] for r in replayed)
    assert known >= 8, known  # weights 0.95 against 0.05: the known ability dominates the draw
    record = json.loads(paths.summary_path(out).read_text())
    assert record["generated"] == 30 and record["replay"] == 10 and record["share"] == 0.25 and record["seed"] == 3
    assert record["training_items"] == 40
    assert record["by_ability"]["Root > Area > Known"] == {"available": 20, "weight": 0.95, "drawn": known}
    assert record["replay_ids"] == [r["replay_of"] for r in replayed]


def test_the_draw_is_seeded(tmp_path, run):
    inputs(tmp_path)
    a = (tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl")
    replay(run, tmp_path, a[0], "--replay_fraction", "0.4", "--seed", "1")
    replay(run, tmp_path, a[1], "--replay_fraction", "0.4", "--seed", "1")
    replay(run, tmp_path, a[2], "--replay_fraction", "0.4", "--seed", "2")
    assert a[0].read_bytes() == a[1].read_bytes()
    assert a[0].read_bytes() != a[2].read_bytes()


def test_more_than_the_dataset_takes_all_of_it_then_repeats_the_known_abilities(tmp_path, run):
    inputs(tmp_path, n_generated=30, n_per_leaf=5)
    mix = replay(run, tmp_path, tmp_path / "all.jsonl", "--replay_fraction", "0.375")  # 18 wanted, 10 available
    replayed = [r for r in mix if r.get("source") == "replay"]
    assert len(replayed) == 18 and len({r["id"] for r in mix}) == 48  # the share holds; ids stay unique
    first = [r for r in replayed if r["replay_pass"] == 1]
    assert len(first) == 10 and len({r["replay_of"] for r in first}) == 10  # every question once ...
    again = [r for r in replayed if r["replay_pass"] == 2]
    assert all(r["id"] == f"replay2-{r['replay_of']}" for r in again)
    assert len(again) == 8 and sum(r["ability_path"][-1] == "Known" for r in again) == 5  # ... then the known first
    record = json.loads(paths.summary_path(tmp_path / "all.jsonl").read_text())
    assert record["replay_wanted"] == record["replay"] == 18 and record["passes"] == 2 and record["share"] == 0.375


def test_bad_paths_and_fractions_exit_2_without_output(tmp_path, run):
    inputs(tmp_path)

    write_jsonl(tmp_path / "paths.jsonl", [{"id": "q0", "ability_path": ["Area", "Nowhere"]}])
    out = tmp_path / "bad" / "train.jsonl"
    res = run("add_replay.py", "--validated_file", tmp_path / "validated.jsonl", "--dataset_path",
              tmp_path / "data.jsonl", "--ability_class_path", tmp_path / "paths.jsonl", "--ability_tree_path",
              tmp_path / "tree.json", "--output_path", out, "--replay_fraction", "0.2")
    assert res.returncode == 2 and f"error: {tmp_path / 'paths.jsonl'}:1: ability path" in res.stderr
    assert not out.parent.exists()
    res = run("add_replay.py", "--validated_file", "v", "--dataset_path", "d", "--ability_class_path", "p",
              "--ability_tree_path", "t", "--output_path", out, "--replay_fraction", "1")
    assert res.returncode == 2 and "--replay_fraction must be in [0, 1) (got 1.0)" in res.stderr


def test_the_count_gives_the_share_nearest_the_fraction():
    # 2 items at 0.2: f n / (1 - f) = 0.5; 0 replayed is a share of 0 (0.2 off), 1 a share of 1/3 (0.133 off).
    assert replay_count(2, 0.2) == 1
    # 30 at 0.25: exactly 10. 5 at 0.2: 1.25 -> 1 (1/6, 0.033 off) rather than 2 (2/7, 0.086 off).
    assert replay_count(30, 0.25) == 10 and replay_count(5, 0.2) == 1
    # 10 at 0.01: 0.101 -> 0 (0.01 off) rather than 1 (1/11, 0.081 off); none without items or fraction.
    assert replay_count(10, 0.01) == 0 and replay_count(0, 0.2) == 0 and replay_count(7, 0.0) == 0
    # A tie goes up: 1 item at 0.25 is 0.25 off with none (share 0) and with one (share 1/2).
    assert replay_count(1, 0.25) == 1
    for n in range(1, 60):
        for f in (0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 0.75):
            r = replay_count(n, f)
            assert all(abs(r / (n + r) - f) <= abs(k / (n + k) - f) + 1e-12 for k in range(0, 4 * n)), (n, f)


def test_two_items_at_a_fifth_get_one_replayed(tmp_path, run):
    inputs(tmp_path, n_generated=2)
    mix = replay(run, tmp_path, tmp_path / "two.jsonl", "--replay_fraction", "0.2")
    assert sum(r.get("source") == "replay" for r in mix) == 1 and len(mix) == 3
    record = json.loads(paths.summary_path(tmp_path / "two.jsonl").read_text())
    assert record["replay"] == 1 and record["share"] == 1 / 3 and record["training_items"] == 3


def chain(run, tmp_path, server, fraction: float, use_dataset_explanation: bool) -> tuple[list[dict], dict]:
    """D3 then D2 as main.py chains them in rationale style with replay, on 5 validated items of which the
    scripted teacher's replies keep 2; returns the file E and F read, and D2's summary.json."""
    import main
    from dataclasses import replace

    from atkd.cli import parse_config, to_argv
    from atkd.plan import training_data_steps, training_items
    from atkd.workflow import WorkflowConfig

    it = paths.IterationPaths(tmp_path / "wf", tmp_path / "models", 1)
    write_jsonl(it.validated, items())
    # The round's questions: the teacher would explain each ("OK:"); half carry the dataset's own explanation.
    dataset = [{"id": f"d{k}", "question": f"OK: question {k}?", "options": OPTS, "answer_idx": "C",
                **({"explanation": f"Dataset reason {k}."} if k % 2 else {})} for k in range(12)]
    write_jsonl(tmp_path / "data.jsonl", dataset)
    write_jsonl(tmp_path / "paths.jsonl", [{"id": q["id"], "ability_path": ["Med", "Cardio"]} for q in dataset])
    tree = tree_from_nested({"Cardio": 0, "Resp": 0}, domain="Med")
    for node in tree.nodes():
        node.stats = {"n": 10, "correct": 5, "accuracy": 0.5, "smoothed_accuracy": 0.5, "weakness": 0.5}
    tree.save_scored(it.scored_tree)
    cfg = replace(parse_config(WorkflowConfig, [], defaults=main.defaults()), response_style="rationale",
                  replay_fraction=fraction, use_dataset_explanation=use_dataset_explanation,
                  teacher_api_base=server.url, teacher_api_model="teacher")
    env = {"OMP_NUM_THREADS": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    for step in training_data_steps(cfg, it, str(tmp_path / "data.jsonl"), str(tmp_path / "paths.jsonl"), 0, []):
        res = run(step.script, *to_argv(step.cfg), env=env)
        assert res.returncode == 0, res.stderr
    return read_jsonl(training_items(cfg, it)), json.loads(paths.summary_path(it.replay_mix).read_text())


def test_the_share_is_exact_over_the_items_left_after_rationales(tmp_path, run, teacher):
    final, record = chain(run, tmp_path, teacher, 0.5, use_dataset_explanation=True)
    replayed = [r for r in final if r.get("source") == "replay"]
    # D3 kept 2 of the 5 (ok; own, with the dataset's explanation): 2 replayed make exactly half.
    assert [r["id"] for r in final if r.get("source") != "replay"] == ["ok", "own"]
    assert len(replayed) == 2 and len(final) == 4
    assert record["generated"] == 2 and record["replay"] == 2 and record["share"] == 0.5
    # The teacher is not asked about replay items: they keep the letter, or the dataset's own explanation.
    assert sorted(teacher.asked) == ["BARE", "MUTE", "OK", "WRONG"]
    for r in replayed:
        own = int(r["replay_of"][1:]) % 2 == 1
        assert r.get("explanation") == (f"Dataset reason {r['replay_of'][1:]}." if own else None)


def test_without_dataset_explanations_replay_items_train_on_their_letter(tmp_path, run, teacher):
    final, record = chain(run, tmp_path, teacher, 0.2, use_dataset_explanation=False)
    replayed = [r for r in final if r.get("source") == "replay"]
    # D3 kept ok and own (the teacher's words this time); 2 items at 0.2: 1 replayed, a third of 3.
    assert len(final) == 3 and len(replayed) == 1 and record["share"] == 1 / 3
    assert "explanation" not in replayed[0]
