"""train.py: training examples (the teacher's prompt and letter), bad input, resume after SIGKILL, accelerate launch."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, make_questions
from safetensors.torch import load_file

import train
from atkd.head import HeadAtPositions
from atkd.io import write_jsonl
from atkd.letters import letter_token_ids
from atkd.logits_store import LogitsStore
from atkd.models import load_model, load_tokenizer
from atkd.prompts import encode_prompt, mcq_prompt
from atkd.records import load_questions
from atkd.sequence import sha256_text
from atkd.teacher_logits import LogitsConfig
from atkd.teacher_logits import run as run_teacher_logits
from atkd.train_data import build_examples, collate
from atkd.plan import free_port

N_ITEMS = 24


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = make_questions(N_ITEMS, seed=3)
    for i, q in enumerate(rows):
        if i % 2:
            q["explanation"] = f"Because the {q['options'][q['answer_idx']]} is right."
    path = tmp_path_factory.mktemp("train_data") / "validated.jsonl"
    write_jsonl(path, rows)
    return path


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory, llama_dir, data_file):
    """Teacher logits of the tiny Llama (in-process: the CLI is covered in test_logits.py)."""
    out = tmp_path_factory.mktemp("logits") / "E_teacher_logits"
    run_teacher_logits(LogitsConfig(model_path=str(llama_dir), dataset_path=str(data_file), output_dir=str(out),
                                    top_k=8, batch_size=8, response_field="explanation", shard_size=10))
    return out


def test_training_prompt_and_letter_are_the_teachers(llama_dir, data_file, store_dir):
    """Same bytes, same tokens, same positions: a student identical to the teacher reproduces its numbers
    (the reference re-tokenised a prompt string holding a literal backslash-n, and mixed " A" and "A")."""
    tok = load_tokenizer(llama_dir)
    store = LogitsStore.open(store_dir)
    questions = load_questions(data_file)
    examples, stats = build_examples(questions, store, tok, "en", 512, str(data_file))
    assert stats.token_level == N_ITEMS // 2 and stats.option_only == N_ITEMS // 2
    for q, ex in zip(questions, examples):
        text = mcq_prompt(tok, q, "en")
        assert "\\n" not in text  # the reference's prompt held a literal backslash-n
        assert sha256_text(text) == store.items[q.key]["prompt_sha256"]  # byte-identical to the teacher's
        assert ex.prompt_ids == encode_prompt(tok, text)
        letters = letter_token_ids(tok, q.letters, "en")
        assert ex.option_ids == letters  # KD reads the letter tokens CE trains ...
        assert ex.response_ids[0] == letters[q.letters.index(q.answer_idx)]  # ... and CE trains the answer's
        if q.extra.get("explanation"):
            assert ex.response_ids[-1] == tok.eos_token_id and len(ex.response_ids) > 2

    # The student here *is* the teacher: at the training positions it must give the stored numbers.
    head = HeadAtPositions(load_model(llama_dir), len(tok))
    batch = collate(examples, [1.0] * len(examples), tok.pad_token_id)
    with torch.no_grad():
        logits = head(batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["rows"], batch["cols"])
    letter = logits[batch["opt_index"]].gather(-1, batch["opt_ids"]).masked_fill(~batch["opt_mask"], float("-inf"))
    got = torch.log_softmax(letter, -1)
    assert torch.allclose(got[batch["opt_mask"]], batch["opt_teacher"][batch["opt_mask"]], atol=1e-4)
    full = torch.log_softmax(logits[batch["tok_index"]], -1)
    assert torch.allclose(full.gather(-1, batch["tok_ids"]), batch["tok_logp"], atol=1e-4)
    assert (batch["weights"].sum() == sum(len(ex.response_ids) for ex in examples))  # CE: response tokens only


def test_another_tokenizer_gets_option_level_kd_on_its_own_letter_tokens(qwen_plain_dir, data_file, store_dir):
    tok = load_tokenizer(qwen_plain_dir)  # Metaspace tokenizer, no chat template: the letter is " A"-like
    examples, stats = build_examples(load_questions(data_file), LogitsStore.open(store_dir), tok, "en", 512, "d")
    assert stats.token_level == 0 and stats.token_level_off == {"different tokenizer": N_ITEMS // 2}
    for q, ex in zip(load_questions(data_file), examples):
        letters = letter_token_ids(tok, q.letters, "en")
        assert ex.option_ids == letters and ex.response_ids[0] == letters[q.letters.index(q.answer_idx)]
        assert ex.topk_ids is None
        batch = collate([ex], [1.0], tok.pad_token_id)
        full = ex.prompt_ids + ex.response_ids
        # CE targets are exactly the response tokens, read one position earlier.
        assert batch["targets"].tolist() == ex.response_ids
        assert batch["input_ids"][0, batch["cols"]].tolist() == full[len(ex.prompt_ids) - 1:-1]


def train_args(student, data, logits, out, *extra):
    return ["--student_model_path", str(student), "--train_file_path", str(data), "--teacher_logits_dir", str(logits),
            "--output_dir", str(out), "--num_epochs", "1", "--batch_size", "2", "--gradient_accumulation_steps", "2",
            "--learning_rate", "2e-3", "--warmup_ratio", "0.1", "--save_steps", "2", "--save_total_limit", "2",
            "--logging_steps", "1", "--seed", "7", *map(str, extra)]


def test_missing_logits_and_empty_data_exit_2(tmp_path, llama_dir, data_file, store_dir, capsys):
    extra = make_questions(1, seed=9, id_prefix="new-")
    rows = [q.to_dict() for q in load_questions(data_file)] + extra
    bad = tmp_path / "more.jsonl"
    write_jsonl(bad, rows)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    for path, problem in [(bad, "item 'new-0' has no teacher logits"), (empty, "file is empty")]:
        out = tmp_path / f"out-{path.stem}"
        with pytest.raises(SystemExit) as err:
            train.main(train_args(llama_dir, path, store_dir, out))
        assert err.value.code == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and problem in lines[0] and str(path) in lines[0]
        assert not out.exists()


def launch(args, n_proc=None, **popen):
    """train.py as main.py starts it: through `accelerate launch` (a single CPU process with --cpu)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    if n_proc is None:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu"]
    else:
        # Really n CPU processes: torch.distributed.run (gloo); accelerate's --cpu mode would start one.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n_proc),
               "--main_process_port", str(free_port())]  # not 29500: other runs on the machine may hold it
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train.py"), *args]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, llama_dir, data_file, store_dir):
    out = tmp_path_factory.mktemp("run") / "iteration_1_student_model"
    finish(launch(train_args(llama_dir, data_file, store_dir, out)))
    return out


def test_accelerate_launch_cpu_writes_exactly_one_final_model(uninterrupted, llama_dir):
    from transformers import AutoModelForCausalLM

    names = sorted(p.name for p in uninterrupted.iterdir())
    # 24 items / (2 per micro-batch x 2 micro-batches) = 6 steps; checkpoints every 2, the newest 2 kept
    assert names == ["checkpoint-2", "checkpoint-4", "final_model", "train.done.json"]
    final = uninterrupted / "final_model"
    model = AutoModelForCausalLM.from_pretrained(str(final), use_safetensors=True)
    assert (final / "tokenizer.json").is_file() and model.config.vocab_size == len(load_tokenizer(final))
    assert max_diff(weights(final), weights(llama_dir)) > 1e-4  # it trained
    log = json.loads((final / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in log] == list(range(1, 7)) and all(e["kd"] >= -1e-6 for e in log)


def test_rerun_is_a_no_op_and_other_settings_retrain(tmp_path, uninterrupted, llama_dir, data_file, store_dir,
                                                     caplog):
    final = uninterrupted / "final_model"
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="atkd"):
        assert train.main(train_args(llama_dir, data_file, store_dir, uninterrupted)) == 0  # done: nothing to do
    assert "nothing to do" in caplog.text
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp

    # Other settings in a folder trained before: its checkpoints are stale, removed (not resumed), and it trains again.
    out = tmp_path / "retrained"
    shutil.copytree(uninterrupted, out)
    old_fingerprint = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["fingerprint"]
    assert old_fingerprint["alpha_ce"] == 0.5
    log = finish(launch(train_args(llama_dir, data_file, store_dir, out, "--alpha_ce", "0.9")))
    for name in ("checkpoint-2", "checkpoint-4"):
        assert f"removing {out / name}: it was trained with other settings or inputs" in log
    assert "resumed from" not in log
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "final_model", "train.done.json"]
    for folder in ("checkpoint-2", "checkpoint-4", "final_model"):
        state = json.loads((out / folder / "trainer_state.json").read_text())
        assert state["fingerprint"]["alpha_ce"] == 0.9
        assert {k: v for k, v in state["fingerprint"].items() if k != "alpha_ce"} == {
            k: v for k, v in old_fingerprint.items() if k != "alpha_ce"}
    state = json.loads((out / "final_model" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"]] == list(range(1, 7))  # all six steps, from the start
    assert json.loads((out / "train.done.json").read_text())["fingerprint"]["alpha_ce"] == 0.9
    assert max_diff(weights(out / "final_model"), weights(final)) > 1e-6  # other weights than alpha_ce 0.5 gave
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp  # the original folder is untouched

    new_stamp = (out / "final_model" / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="atkd"):
        assert train.main(train_args(llama_dir, data_file, store_dir, out, "--alpha_ce", "0.9")) == 0
    assert "nothing to do" in caplog.text
    assert (out / "final_model" / "model.safetensors").stat().st_mtime_ns == new_stamp


@pytest.mark.distributed
def test_two_processes_give_the_weights_of_one(tmp_path, uninterrupted, llama_dir, data_file, store_dir):
    """Loss normalised over the window's tokens on all processes: 2 x batch 1 == 1 x batch 2."""
    out = tmp_path / "ddp"
    args = train_args(llama_dir, data_file, store_dir, out)
    args[args.index("--batch_size") + 1] = "1"
    finish(launch(args, n_proc=2))
    assert [p.name for p in out.iterdir() if p.name == "final_model"] == ["final_model"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and (out / "checkpoint-4" / "rng-1.safetensors").is_file()
    assert max_diff(weights(out / "final_model"), weights(uninterrupted / "final_model")) < 1e-6


def test_resume_after_sigkill_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, uninterrupted, llama_dir,
                                                                            data_file, store_dir):
    out = tmp_path / "killed"
    # Saving every step (it does not change the weights) leaves five more steps and saves to kill into.
    args = train_args(llama_dir, data_file, store_dir, out, "--save_steps", "1")
    proc = launch(args, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "checkpoint-1").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and train.py, mid-run
    proc.communicate()
    assert (out / "checkpoint-1").is_dir()
    assert not (out / "final_model").exists(), "the run finished before it could be killed"

    log = finish(launch(args))
    assert "resumed from" in log
    assert max_diff(weights(out / "final_model"), weights(uninterrupted / "final_model")) < 1e-6
    assert not list(out.glob(".tmp-*"))
