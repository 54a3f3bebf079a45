"""label_abilities.py: the teacher places questions in the tree, level by level; chunks past 26
children; batched scoring equals scoring each question alone; resume after SIGKILL; bad input."""

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


def test_walk_picks_within_chunks_then_among_winners_and_multiplies_confidence():
    """A made-up scorer that always prefers the last option, with probability (k + 1) / sum(1..n) for the
    k-th: the walk must pick the last child everywhere, with the product of the rounds' probabilities."""
    tree = tree_from_nested(TREE)
    questions = [question_from_dict(q) for q in make_questions(3, seed=2)]
    asked: list[list] = []

    def ask(mcqs, desc):
        asked.append([(m.key, list(m.options.values())) for m in mcqs])
        n = {m.key: len(m.options) for m in mcqs}
        return {m.key: {"pred_letter": LETTERS[n[m.key] - 1],
                        "option_probs": {L: (i + 1) / sum(range(1, n[m.key] + 1)) for i, L in enumerate(m.options)}}
                for m in mcqs}

    placements = place_all(tree, questions, "en", ask)
    # Level 1: two chunks of 15 per question, then the two winners; "Topic 29" is a leaf: nothing more.
    assert [[names for _, names in r] for r in asked] == [[TOPICS[:15], TOPICS[15:]] * 3, [[TOPICS[14], TOPICS[29]]] * 3]
    assert [k for k, _ in asked[0]] == [f"{q.key}#1.0.{c}" for q in questions for c in (0, 1)]
    assert [k for k, _ in asked[1]] == [f"{q.key}#1.1.0" for q in questions]
    assert [p.path for p in placements] == [["Topic 29"]] * 3
    assert all(p.confidence == [pytest.approx(15 / 120 * 2 / 3)] for p in placements)

    # Level 2 under a topic with two children: one question each, the later child.
    asked.clear()
    ps = [Placement(question=q, node=tree.node(("Med", "Topic 0"))) for q in questions]
    choose_children(ps, 2, "en", ask)
    assert [k for k, _ in asked[0]] == [f"{q.key}#2.0.0" for q in questions]
    assert [p.path for p in ps] == [["Topic 0", "Advanced"]] * 3 and [p.confidence for p in ps] == [[2 / 3]] * 3

    # A node with one child: taken with confidence 1, nothing asked.
    asked.clear()
    chain = [Placement(question=questions[0], node=tree.node(("Med", "Topic 28")))]
    choose_children(chain, 2, "en", ask)
    assert asked == [] and chain[0].path == ["Topic 28", "Only"] and chain[0].confidence == [1.0]


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

    summary = json.loads((out.parent / "paths.summary.json").read_text(encoding="utf-8"))
    assert summary["n"] == 24 and summary["levels"][0]["placed"] == 24
    assert summary["levels"][0]["mean"] == pytest.approx(sum(r["confidence"][0] for r in got) / 24)
    assert sum(summary["questions_per_node"][name] for name in TOPICS) == 24
    assert 0 < summary["letter_mass"]["mean_letter_mass"] <= 1
    assert (out.parent / "paths.done.json").is_file() and not parts_dir_for(out).exists()

    again = label(llama_dir, files, out, "--batch_size", 2)  # batch size cannot change results: nothing to do
    assert again.returncode == 0 and "nothing to do" in again.stderr


N_KILLED = 160


def test_resume_after_sigkill_equals_an_uninterrupted_run(llama_dir, tmp_path):
    write_jsonl(tmp_path / "q.jsonl", make_questions(N_KILLED, seed=9))
    (tmp_path / "tree.json").write_text(json.dumps(TREE), encoding="utf-8")
    files = {"questions": tmp_path / "q.jsonl", "tree": tmp_path / "tree.json"}
    whole = tmp_path / "whole" / "paths.jsonl"
    assert label(llama_dir, files, whole, "--batch_size", 2).returncode == 0

    out = tmp_path / "killed" / "paths.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **ONE_THREAD)
    proc = subprocess.Popen([sys.executable, str(ROOT / "label_abilities.py"), "--model_path", str(llama_dir),
                             "--ability_tree_path", str(files["tree"]), "--dataset_path", str(files["questions"]),
                             "--output_path", str(out), "--batch_size", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    part = parts_dir_for(out) / "part-000.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not (part.is_file() and part.stat().st_size):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    done = part.read_text(encoding="utf-8").count("\n")
    assert 0 < done < 2 * N_KILLED, "the kill must land mid-run (in level 1's first round)"

    res = label(llama_dir, files, out, "--batch_size", 2)
    assert res.returncode == 0, res.stderr
    assert "discarding partial work" not in res.stderr and "already written by an earlier run" in res.stderr
    assert out.read_bytes() == whole.read_bytes()
    summary, reference = (json.loads((p.parent / "paths.summary.json").read_text()) for p in (out, whole))
    assert 0 < summary["resumed"] <= done and reference["resumed"] == 0
    for key in ("levels", "questions_per_node", "letter_mass"):
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
