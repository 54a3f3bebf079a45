"""Replay (step D2): a set share of the training items comes from the round's own questions, with their
gold answers, drawn in favour of the abilities the student already answers well; seeded and recorded."""

from __future__ import annotations

import json

from conftest import make_questions

from atkd import paths
from atkd.io import iter_jsonl, write_jsonl
from atkd.replay import replay_count
from atkd.tree import tree_from_nested


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
    record = json.loads(paths.replay_record_path(out).read_text())
    assert record["generated"] == 30 and record["replay"] == 10 and record["share"] == 0.25 and record["seed"] == 3
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
    record = json.loads(paths.replay_record_path(tmp_path / "all.jsonl").read_text())
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
