"""label_abilities.py: the teacher places questions in the tree, level by level; the choice does not
depend on the order of the tree's children (canonical order, every rotation); chunks past 26 children;
batched scoring equals scoring each question alone; resume after SIGKILL; bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import atkd.labelling as labelling
from atkd.io import parts_dir_for, write_jsonl
from atkd.labelling import Placement, choose_children, chunks, place_all
from atkd.models import load_model, load_tokenizer
from atkd.prompts import encode_prompt, mcq_prompt
from atkd.records import LETTERS, load_questions, question_from_dict
from atkd.tree import tree_from_nested
from conftest import ROOT, make_questions, run_script

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# 30 level-1 abilities, more than the 26 letters: every question is placed within two chunks of 15, then
# between the two winners. Below them: two children (a choice), one child (taken without asking) or none.
TOPICS = [f"Topic {i}" for i in range(30)]
TREE = {"Med": {name: {"Basics": 0, "Advanced": 0} if i < 28 else {"Only": 0} if i == 28 else 0
                for i, name in enumerate(TOPICS)}}
# A small three-level tree of the tiny models' words (the demo tree's shape: four areas of three leaves).
SMALL_TREE = {"Med": {"heart": {"aspirin": 0, "insulin": 0, "metoprolol": 0}, "lung": {"virus": 0, "bacteria": 0,
                                                                                         "fungus": 0},
                      "femur": {"nerve": 0, "muscle": 0, "bone": 0}, "kidney": {"enzyme": 0, "protein": 0, "cell": 0}}}


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    write_jsonl(tmp_path / "q.jsonl", make_questions(24, seed=5))
    (tmp_path / "tree.json").write_text(json.dumps(TREE), encoding="utf-8")
    return {"questions": tmp_path / "q.jsonl", "tree": tmp_path / "tree.json"}


def label(model_dir, files, out: Path, *extra, env=ONE_THREAD) -> subprocess.CompletedProcess:
    return run_script("label_abilities.py", "--model_path", model_dir, "--ability_tree_path", files["tree"],
                      "--dataset_path", files["questions"], "--output_path", out, *extra, env=env)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- the walk, with a made-up scorer

def test_chunks_are_at_most_26_and_even():
    assert [len(c) for c in chunks(list(range(30)))] == [15, 15]
    assert [len(c) for c in chunks(list(range(26)))] == [26]
    assert [len(c) for c in chunks(list(range(53)))] == [18, 18, 17]
    assert sum(chunks(list(range(700))), []) == list(range(700)) and max(map(len, chunks(list(range(700))))) <= 26


def reversed_nested(node):
    """The nested tree with every node's children in reverse order."""
    return {k: reversed_nested(v) for k, v in reversed(node.items())} if isinstance(node, dict) else node


def test_rotation_shifts_are_all_or_evenly_spaced():
    assert labelling.rotation_shifts(3, 0) == [0, 1, 2]
    assert labelling.rotation_shifts(15, 0) == list(range(15))
    assert labelling.rotation_shifts(15, 2) == [0, 7] and labelling.rotation_shifts(30, 4) == [0, 7, 15, 22]
    assert labelling.rotation_shifts(3, 5) == [0, 1, 2]  # never more shifts than options


def weight(name: str) -> float:
    """The made-up scorer's liking for an ability: Topic i weighs i + 1, "Advanced" more than "Basics"."""
    return float(name.split()[-1]) + 1 if name.startswith("Topic") else {"Basics": 1.0, "Advanced": 2.0}.get(name, 1.0)


def first_biased_ask(asked: list):
    """A made-up scorer with a strong position bias: the first option's weight is multiplied by 1000.
    The order-dependent walk picks whatever the tree lists first; averaged over every rotation, the
    heaviest child wins."""

    def ask(mcqs, desc):
        asked.append([(m.key, list(m.options.values())) for m in mcqs])
        out = {}
        for m in mcqs:
            w = {L: weight(name) * (1000 if L == "A" else 1) for L, name in m.options.items()}
            total = sum(w.values())
            out[m.key] = {"pred_letter": max(w, key=w.get), "option_probs": {L: v / total for L, v in w.items()}}
        return out

    return ask


def mean_prob(asked_round: list, key_prefix: str, name: str) -> float:
    """`name`'s probability under the made-up scorer averaged over the rotations asked with `key_prefix`."""
    probs = []
    for key, names in asked_round:
        if key.startswith(key_prefix):
            w = [weight(n) * (1000 if i == 0 else 1) for i, n in enumerate(names)]
            probs.append(w[names.index(name)] / sum(w))
    return sum(probs) / len(probs)


def test_walk_asks_every_rotation_of_the_canonical_chunks_and_picks_the_best_mean():
    """30 children: canonical order (by name) cut into two chunks of 15, each asked under its 15 rotations,
    then the two winners under their 2; the winners are the heaviest children although the scorer always
    prefers the first option; the confidence is the product of the winner's mean probabilities."""
    tree = tree_from_nested(TREE)
    questions = [question_from_dict(q) for q in make_questions(3, seed=2)]
    asked: list[list] = []
    placements = place_all(tree, questions, "en", first_biased_ask(asked))

    canon = sorted(TOPICS)  # Topic 0, Topic 1, Topic 10, ..., Topic 19, Topic 2, Topic 20, ...
    halves = [canon[:15], canon[15:]]
    assert [len(r) for r in asked] == [3 * 30, 3 * 2]
    assert asked[0] == [(f"{q.key}#1.0.{c}.{s}", halves[c][s:] + halves[c][:s])
                        for q in questions for c in (0, 1) for s in range(15)]
    winners = [max(h, key=weight) for h in halves]
    assert winners == ["Topic 21", "Topic 29"]
    assert asked[1] == [(f"{q.key}#1.1.0.{s}", winners[s:] + winners[:s]) for q in questions for s in (0, 1)]
    assert [p.path for p in placements] == [["Topic 29"]] * 3
    for q, p in zip(questions, placements):
        expected = (mean_prob(asked[0], f"{q.key}#1.0.1.", "Topic 29")
                    * mean_prob(asked[1], f"{q.key}#1.1.0.", "Topic 29"))
        assert p.confidence == [pytest.approx(expected, rel=1e-12)]

    # The same walk on the tree listed backwards asks the same questions and places the same way.
    again: list[list] = []
    flipped = place_all(tree_from_nested(reversed_nested(TREE)), questions, "en", first_biased_ask(again))
    assert again == asked and [(p.path, p.confidence) for p in flipped] == [(p.path, p.confidence) for p in placements]

    # Level 2 under a topic with two children: both rotations asked, the heavier child wins.
    asked.clear()
    ps = [Placement(question=q, node=tree.node(("Med", "Topic 0"))) for q in questions]
    choose_children(ps, 2, "en", first_biased_ask(asked))
    assert asked == [[(f"{q.key}#2.0.0.{s}", names) for q in questions
                      for s, names in ((0, ["Advanced", "Basics"]), (1, ["Basics", "Advanced"]))]]
    assert [p.path for p in ps] == [["Topic 0", "Advanced"]] * 3

    # Fewer rotations (--rotations 2): two evenly spaced shifts per chunk, still the same for either order.
    few: list[list] = []
    ps = place_all(tree, questions, "en", first_biased_ask(few), rotations=2)
    assert [k for k, _ in few[0]] == [f"{q.key}#1.0.{c}.{s}" for q in questions for c in (0, 1) for s in (0, 7)]
    few_flipped: list[list] = []
    ps_flipped = place_all(tree_from_nested(reversed_nested(TREE)), questions, "en", first_biased_ask(few_flipped),
                           rotations=2)
    assert few_flipped == few and [p.path for p in ps_flipped] == [p.path for p in ps]

    # A node with one child: taken with confidence 1, nothing asked.
    asked.clear()
    chain = [Placement(question=questions[0], node=tree.node(("Med", "Topic 28")))]
    choose_children(chain, 2, "en", first_biased_ask(asked))
    assert asked == [] and chain[0].path == ["Topic 28", "Only"] and chain[0].confidence == [1.0]


DEMO_TEACHER = ROOT / "data" / "demo" / "models" / "teacher"  # a tiny Llama (atkd.tiny) trained to answer and label


def model_ask(model_dir: Path):
    """The stage's own scoring (`atkd.answering.answer_local`, score mode) with a real model, batches of 16."""
    from atkd.answering import Answerer, answer_local

    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    who = Answerer(model_path=str(model_dir), mode="score", lang="en")

    def ask(mcqs, desc):
        return {r["id"]: r for i in range(0, len(mcqs), 16) for r in answer_local(model, tok, mcqs[i:i + 16], who)}

    return ask


@pytest.mark.parametrize("case", ["demo-tree", "30-children"])
def test_placements_do_not_depend_on_the_order_of_the_children(one_thread, case):
    """The demo teacher, a real tiny model with a position bias, labels demo evaluation questions with the
    tree as written and with every node's children reversed: the same paths and confidences. (Listed in
    tree order, the two orders gave different paths for 11 of these 48 questions on the demo tree and for
    all 12 on the 30-children tree, whose winners were the first options of their chunks.)"""
    nested = json.loads((ROOT / "ability_trees" / "demo_tree.json").read_text()) if case == "demo-tree" else TREE
    questions = load_questions(ROOT / "data" / "demo" / "eval.jsonl")[::5][:48 if case == "demo-tree" else 12]
    ask = model_ask(DEMO_TEACHER)
    forward = place_all(tree_from_nested(nested), questions, "en", ask)
    backward = place_all(tree_from_nested(reversed_nested(nested)), questions, "en", ask)
    assert [p.path for p in backward] == [p.path for p in forward]
    assert [p.confidence for p in backward] == [p.confidence for p in forward]
    assert len({tuple(p.path) for p in forward}) > 3  # the model tells the questions apart: not a constant


# --------------------------------------------------------------------------- the script on a tiny model

def test_batched_run_equals_each_question_scored_alone(llama_dir, files, tmp_path, one_thread):
    out = tmp_path / "L" / "paths.jsonl"
    res = label(llama_dir, files, out, "--batch_size", 5)
    assert res.returncode == 0, res.stderr
    got = read_jsonl(out)
    questions = load_questions(files["questions"])
    assert [r["id"] for r in got] == [q.id for q in questions]

    # The reference: the same walk, every labelling question scored alone, unpadded, full-sequence logits.
    tok, model = load_tokenizer(llama_dir), load_model(llama_dir)

    def ask_alone(mcqs, desc):
        out = {}
        for m in mcqs:
            prompt = mcq_prompt(tok, m, "en")
            ids = encode_prompt(tok, prompt)
            letter_ids = [encode_prompt(tok, prompt + L)[len(ids)] for L in m.options]
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].double()
            probs = torch.softmax(logits[letter_ids], -1)
            best = int(probs.argmax())
            out[m.key] = {"pred_letter": LETTERS[best], "option_probs": dict(zip(m.options, probs.tolist()))}
        return out

    tree = tree_from_nested(TREE)
    reference = place_all(tree, questions, "en", ask_alone)
    assert [r["ability_path"] for r in got] == [p.path for p in reference]
    for r, p in zip(got, reference):
        assert len(r["confidence"]) == len(r["ability_path"])
        assert max(abs(a - b) for a, b in zip(r["confidence"], p.confidence)) < 1e-5
        assert tree.match(r["ability_path"]).is_leaf
    assert any(len(r["ability_path"]) == 2 for r in got)

    summary = json.loads((out.parent / "summary.json").read_text(encoding="utf-8"))
    assert summary["n"] == 24 and summary["levels"][0]["placed"] == 24
    assert summary["levels"][0]["mean"] == pytest.approx(sum(r["confidence"][0] for r in got) / 24)
    assert sum(summary["questions_per_node"][name] for name in TOPICS) == 24
    assert 0 < summary["letter_mass"]["mean_letter_mass"] <= 1
    assert (out.parent / "label.done.json").is_file() and not parts_dir_for(out).exists()

    again = label(llama_dir, files, out, "--batch_size", 2)  # batch size cannot change results: nothing to do
    assert again.returncode == 0 and "nothing to do" in again.stderr


N_KILLED = 16  # x 34 labelling prompts each (30 rotations in level 1, then 2 and 2)


def test_resume_after_sigkill_equals_an_uninterrupted_run(llama_dir, tmp_path):
    write_jsonl(tmp_path / "q.jsonl", make_questions(N_KILLED, seed=9))
    (tmp_path / "tree.json").write_text(json.dumps(TREE), encoding="utf-8")
    files = {"questions": tmp_path / "q.jsonl", "tree": tmp_path / "tree.json"}
    whole = tmp_path / "whole" / "paths.jsonl"
    assert label(llama_dir, files, whole, "--batch_size", 8).returncode == 0

    out = tmp_path / "killed" / "paths.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **ONE_THREAD)
    proc = subprocess.Popen([sys.executable, str(ROOT / "label_abilities.py"), "--model_path", str(llama_dir),
                             "--ability_tree_path", str(files["tree"]), "--dataset_path", str(files["questions"]),
                             "--output_path", str(out), "--batch_size", "8"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    part = parts_dir_for(out) / "part-000.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (part.is_file() and part.stat().st_size):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done = part.read_text(encoding="utf-8").count("\n")
    assert 0 < done < 30 * N_KILLED, "the kill must land mid-run (in level 1's first round: 30 rotations each)"

    res = label(llama_dir, files, out, "--batch_size", 8)
    assert res.returncode == 0, res.stderr
    assert "discarding partial work" not in res.stderr and "already written by an earlier run" in res.stderr
    assert out.read_bytes() == whole.read_bytes()
    summary, reference = (json.loads((p.parent / "summary.json").read_text()) for p in (out, whole))
    assert 0 < summary["resumed"] <= done and reference["resumed"] == 0
    for key in ("levels", "questions_per_node", "letter_mass", "cost"):  # cost: resumed prompts included
        assert summary[key] == reference[key]
    assert not parts_dir_for(out).exists()


GOOD = {"id": 0, "question": "Which organ?", "options": {"A": "heart", "B": "lung"}, "answer_idx": "A"}


@pytest.mark.parametrize("case", ["broken-line", "missing-model", "tree-not-json", "output-is-dataset",
                                  "empty-tree"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(llama_dir, tmp_path, run, case):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + ('{"id": 1, "question"' if case == "broken-line" else "") + "\n",
                    encoding="utf-8")
    tree = tmp_path / "tree.json"
    tree.write_text({"tree-not-json": "{oops", "empty-tree": "{}"}.get(case, json.dumps(TREE)), encoding="utf-8")
    model = tmp_path / "no-model" if case == "missing-model" else llama_dir
    out = data if case == "output-is-dataset" else tmp_path / "L" / "paths.jsonl"
    res = run("label_abilities.py", "--model_path", model, "--ability_tree_path", tree, "--dataset_path", data,
              "--output_path", out)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    expected = {"broken-line": f"error: {data}:2: not valid JSON",
                "missing-model": f"error: {model}: model folder not found",
                "tree-not-json": f"error: {tree}:1: not valid JSON",
                "output-is-dataset": "error: --output_path is --dataset_path itself; it would be overwritten",
                "empty-tree": f"error: {tree}: an ability tree must be a non-empty JSON object"}[case]
    assert lines[0].startswith(expected), lines[0]
    assert not (tmp_path / "L").exists()
    assert data.read_text(encoding="utf-8").startswith(json.dumps(GOOD))
