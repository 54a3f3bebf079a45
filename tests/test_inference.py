"""inference.py end to end: both modes on two tokenizer styles, scoring against a slow per-item
reference, resume after a real SIGKILL, and bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from atkd.io import parts_dir_for, write_jsonl
from atkd.letters import extract_letter
from atkd.models import load_model, load_tokenizer
from atkd.prompts import encode_prompt, mcq_prompt
from atkd.records import question_from_dict
from conftest import ROOT, make_questions, run_script

REPLY_KEYS = ["pred_letter", "option_probs", "letter_mass", "tied_top", "raw_reply", "correct", "mode"]
# Tiny models run faster on one thread than on several fighting over CI's two cores.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def mixed_questions() -> list[dict]:
    """Varied lengths, 2 to 5 options, int and str ids, an extra field: padding and per-item letters matter."""
    rows = make_questions(14, seed=1)
    rows += make_questions(6, seed=2, n_options=2, id_prefix="two-")
    long = make_questions(6, seed=3, n_options=5, id_prefix="five-")
    for i, q in enumerate(long):
        q["question"] = q["question"] + " Consider the blood and the bone." * (i + 1)
        q["source"] = "long"
    return rows + long


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def check_replies(inputs: list[dict], out: Path, mode: str, model_dir: Path) -> tuple[list[dict], dict]:
    """The output contract: one reply per question in input order, question fields kept, the summary agrees."""
    replies = read_jsonl(out)
    assert [r["id"] for r in replies] == [q["id"] for q in inputs]
    for q, r in zip(inputs, replies):
        assert list(r) == list(q) + REPLY_KEYS
        assert {k: r[k] for k in q} == q
        assert r["mode"] == mode
        assert r["pred_letter"] is None or r["pred_letter"] in q["options"]
        assert r["correct"] is (r["pred_letter"] == q["answer_idx"])
    summary = json.loads((out.parent / "summary.json").read_text(encoding="utf-8"))
    correct = sum(r["correct"] for r in replies)
    assert (summary["n"], summary["correct"], summary["mode"], summary["lang"]) == (len(inputs), correct, mode, "en")
    assert summary["accuracy"] == pytest.approx(correct / len(inputs))
    assert summary["model_path"] == str(model_dir) and summary["items_per_s"] > 0
    assert (out.parent / "answer.done.json").is_file() and not (out.parent / "replies.args.json").exists()
    assert not parts_dir_for(out).exists()
    return replies, summary


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen_plain_dir"])
def test_score_mode_equals_per_item_full_forward(request, fixture, tmp_path, run, one_thread):
    model_dir = request.getfixturevalue(fixture)
    inputs = mixed_questions()
    write_jsonl(tmp_path / "data.jsonl", inputs)
    out = tmp_path / "A" / "replies.jsonl"
    res = run("inference.py", "--model_path", model_dir, "--dataset_path", tmp_path / "data.jsonl",
              "--output_path", out, "--batch_size", 4, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    replies, summary = check_replies(inputs, out, "score", model_dir)
    assert summary["unparsed"] is None
    assert summary["tied_top"] == sum(r["tied_top"] for r in replies) == 0
    assert summary["letter_mass"]["n"] == len(inputs)
    assert summary["letter_mass"]["mean_letter_mass"] == pytest.approx(sum(r["letter_mass"] for r in replies) / len(inputs))

    # Slow reference: each prompt alone, unpadded, full-sequence logits; the letter token derived
    # from the prompt followed by the letter.
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    prefix = "" if tok.chat_template else " "
    for q, r in zip(inputs, replies):
        prompt = mcq_prompt(tok, question_from_dict(q), "en")
        ids = encode_prompt(tok, prompt)
        letter_ids = [encode_prompt(tok, prompt + prefix + L)[len(ids)] for L in q["options"]]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
        full = torch.log_softmax(logits, -1)
        probs = torch.softmax(logits[letter_ids], -1)
        assert list(r["option_probs"]) == list(q["options"])
        assert max(abs(r["option_probs"][L] - probs[i].item()) for i, L in enumerate(q["options"])) < 1e-5
        assert abs(r["letter_mass"] - full[letter_ids].exp().sum().item()) < 1e-5
        assert r["pred_letter"] == list(q["options"])[int(probs.argmax())]
        assert r["raw_reply"] is None


@pytest.mark.parametrize("fixture", ["llama_dir", "qwen_plain_dir"])
def test_generate_mode_writes_replies_and_counts_unparsed(request, fixture, tmp_path, run, one_thread):
    model_dir = request.getfixturevalue(fixture)
    inputs = mixed_questions()[10:22]
    write_jsonl(tmp_path / "data.jsonl", inputs)
    out = tmp_path / "A" / "replies.jsonl"
    res = run("inference.py", "--model_path", model_dir, "--dataset_path", tmp_path / "data.jsonl",
              "--output_path", out, "--mode", "generate", "--max_new_tokens", 10, "--batch_size", 5, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    replies, summary = check_replies(inputs, out, "generate", model_dir)
    assert summary["unparsed"] == sum(r["pred_letter"] is None for r in replies)
    assert all(r["option_probs"] is None and r["letter_mass"] is None and r["tied_top"] is None for r in replies)
    assert summary["letter_mass"] is None and summary["tied_top"] is None

    # Batched, left-padded greedy generation says what each prompt alone would have said.
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    for q, r in list(zip(inputs, replies))[:4]:
        ids = encode_prompt(tok, mcq_prompt(tok, question_from_dict(q), "en", cot=True))
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        assert r["raw_reply"] == tok.decode(gen[0, len(ids):], skip_special_tokens=True)
        assert r["pred_letter"] == extract_letter(r["raw_reply"], list(q["options"]), q["options"])


def start_inference(model_dir: Path, data: Path, out: Path, batch_size: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **ONE_THREAD)
    return subprocess.Popen([sys.executable, str(ROOT / "inference.py"), "--model_path", str(model_dir),
                             "--dataset_path", str(data), "--output_path", str(out), "--batch_size", str(batch_size)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)


def kill_after_first_batches(proc: subprocess.Popen, part: Path, timeout: float = 120) -> None:
    """SIGKILL the run as soon as its part file holds a finished batch (mid-run: most batches remain)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if part.is_file() and part.stat().st_size > 0:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


N_KILLED = 400


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, llama_dir):
    """An uninterrupted run and a run SIGKILLed mid-way (its parts copied aside), both with --batch_size 2."""
    folder = tmp_path_factory.mktemp("killed_run")
    data = folder / "data.jsonl"
    write_jsonl(data, make_questions(N_KILLED, seed=3))
    whole = folder / "whole" / "replies.jsonl"
    res = run_script("inference.py", "--model_path", llama_dir, "--dataset_path", data, "--output_path", whole,
                     "--batch_size", 2, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr

    out = folder / "killed" / "replies.jsonl"
    parts = parts_dir_for(out)
    proc = start_inference(llama_dir, data, out, batch_size=2)
    kill_after_first_batches(proc, parts / "part-000.jsonl")
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    done_lines = (parts / "part-000.jsonl").read_text(encoding="utf-8").count("\n")
    assert 0 < done_lines < N_KILLED, "the kill must land mid-run"
    shutil.copytree(parts, folder / "parts-copy")
    return {"data": data, "whole": whole, "parts": folder / "parts-copy", "done_lines": done_lines}


def killed_output(tmp_path: Path, killed_run: dict) -> Path:
    """A fresh output path whose parts folder holds what the killed run left behind."""
    out = tmp_path / "killed" / "replies.jsonl"
    shutil.copytree(killed_run["parts"], parts_dir_for(out))
    return out


def test_resume_after_sigkill_gives_identical_file(tmp_path, llama_dir, run, killed_run):
    out = killed_output(tmp_path, killed_run)
    args = ["--model_path", llama_dir, "--dataset_path", killed_run["data"], "--output_path", out]
    res = run("inference.py", *args, "--batch_size", 2, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    assert "discarding partial work" not in res.stderr
    resumed = int(re.search(rf"(\d+) of {N_KILLED} answers already written by an earlier run", res.stderr).group(1))
    assert 0 < resumed <= killed_run["done_lines"]
    assert json.loads(summary_text(out))["resumed"] == resumed
    assert out.read_bytes() == killed_run["whole"].read_bytes()
    assert not parts_dir_for(out).exists()


def test_a_smaller_batch_after_a_kill_keeps_the_answers_already_written(tmp_path, llama_dir, run, killed_run):
    """Batch sizes are declared not to change results (a run that ran out of memory is resumed with a smaller
    batch without losing its work): the letters are an uninterrupted run's, and the probabilities differ
    only by the padding's float rounding."""
    out = killed_output(tmp_path, killed_run)
    args = ["--model_path", llama_dir, "--dataset_path", killed_run["data"], "--output_path", out]
    res = run("inference.py", *args, "--batch_size", 1, env=ONE_THREAD)
    assert res.returncode == 0, res.stderr
    assert "discarding partial work" not in res.stderr
    resumed = json.loads(summary_text(out))["resumed"]
    assert 0 < resumed <= killed_run["done_lines"]
    got = [json.loads(x) for x in out.read_text().splitlines()]
    whole = [json.loads(x) for x in killed_run["whole"].read_text().splitlines()]
    assert [r["pred_letter"] for r in got] == [r["pred_letter"] for r in whole]
    worst = max(abs(a["option_probs"][k] - b["option_probs"][k]) for a, b in zip(got, whole) for k in a["option_probs"])
    assert worst < 1e-5


def summary_text(out: Path) -> str:
    return (out.parent / "summary.json").read_text(encoding="utf-8")


GOOD = {"id": 0, "question": "Which organ?", "options": {"A": "heart", "B": "lung"}, "answer_idx": "A"}


def line(**changes) -> str:
    rec = dict(GOOD, **changes)
    return json.dumps({k: v for k, v in rec.items() if v is not None})


@pytest.mark.parametrize("content,lineno,problem", [
    (line() + "\n" + '{"id": 1, "question": "Which?"' + "\n", 2, "not valid JSON"),
    (line() + "\n" + line(id=1, question=None) + "\n", 2, 'missing field "question"'),
    (line() + "\n" + line() + "\n", 2, "duplicate id 0"),
    (line() + "\n" + line(id=1, answer_idx="C") + "\n", 2, "answer_idx 'C' is not among the options"),
    ("\n", None, "file is empty"),
    (line() + "\n", None, "model folder not found"),
], ids=["unparsable", "missing-field", "duplicate-id", "answer-not-in-options", "empty", "missing-model"])
def test_bad_input_exits_2_with_one_line_and_no_output(tmp_path, llama_dir, run, content, lineno, problem):
    data = tmp_path / "data.jsonl"
    data.write_text(content, encoding="utf-8")
    model = tmp_path / "no-such-model" if problem == "model folder not found" else llama_dir
    out = tmp_path / "A" / "replies.jsonl"
    res = run("inference.py", "--model_path", model, "--dataset_path", data, "--output_path", out)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    where = str(model) if problem == "model folder not found" else f"{data}:{lineno}" if lineno else str(data)
    assert lines[0].startswith(f"error: {where}: ") and problem in lines[0]
    assert not out.exists() and not parts_dir_for(out).exists() and not out.parent.exists()


def _truncated(folder: Path) -> Path:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])  # a download cut short
    return f


def _pickle_only(folder: Path) -> Path:
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    return folder


def _missing_shard(folder: Path) -> Path:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return folder / "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("damage,problem", [
    (_truncated, "unreadable safetensors file, truncated or corrupt?"),
    (_pickle_only, "only pickle weights (pytorch_model.bin)"),
    (_missing_shard, "weight file listed in the safetensors index not found"),
], ids=["truncated", "pickle-only", "missing-shard"])
def test_damaged_weights_exit_2_before_any_output(tmp_path, llama_dir, run, damage, problem):
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    where = damage(model)
    data = tmp_path / "data.jsonl"
    data.write_text(line() + "\n", encoding="utf-8")
    out = tmp_path / "A" / "replies.jsonl"
    res = run("inference.py", "--model_path", model, "--dataset_path", data, "--output_path", out)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip().splitlines()[0]]
    assert res.stderr.startswith(f"error: {where}: {problem}"), res.stderr
    assert not out.parent.exists()


def test_rerun_is_a_no_op_and_a_changed_input_redoes_it(tmp_path, llama_dir, run):
    data = tmp_path / "data.jsonl"
    write_jsonl(data, make_questions(6, seed=4))
    out = tmp_path / "A" / "replies.jsonl"
    args = ["--model_path", llama_dir, "--dataset_path", data, "--output_path", out]
    assert run("inference.py", *args, env=ONE_THREAD).returncode == 0
    stamps = [(p.name, p.stat().st_mtime_ns) for p in sorted(out.parent.iterdir())]
    assert [name for name, _ in stamps] == ["answer.done.json", "replies.jsonl", "summary.json"]

    again = run("inference.py", *args, env=ONE_THREAD)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    assert [(p.name, p.stat().st_mtime_ns) for p in sorted(out.parent.iterdir())] == stamps

    write_jsonl(data, make_questions(7, seed=4))  # same path, other content
    redo = run("inference.py", *args, env=ONE_THREAD)
    assert redo.returncode == 0 and "nothing to do" not in redo.stderr and "dataset_path" in redo.stderr
    assert len(read_jsonl(out)) == 7 and json.loads(summary_text(out))["n"] == 7


def test_help(run):
    res = run("inference.py", "--help")
    assert res.returncode == 0
    for flag in ("--model_path", "--dataset_path", "--output_path", "--gpu_ids", "--max_new_tokens", "--mode",
                 "--batch_size", "--seed", "--lang", "--dtype", "--trust_remote_code"):
        assert flag in res.stdout
