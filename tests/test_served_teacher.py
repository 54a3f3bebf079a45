"""The teacher anywhere: step E, the teacher's evaluation, labelling and the agents through a served model.

Against a real engine: the demo's teacher and agent served by llama.cpp (`served_llama.served_demo`),
compared with the same weights run locally by transformers; main.py with the teacher and both agents
served and only the student local, killed and resumed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import killed_when, parts_written, run_script
from served_llama import served_demo  # noqa: F401  (the session fixture)

from atkd.api import APIError
from atkd.io import read_json, write_jsonl
from atkd.logits_store import LogitsStore
from atkd.served_teacher import padded_rows

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def run_stage(stage: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m atkd <stage> <argv>`, through the stage's script (`conftest.run_script` decides which scripts
    run in this process and which in their own)."""
    from atkd.stages import stage_named

    proc = run_script(stage_named(stage).script, *argv, env=env())
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def tokenizer_only(folder: Path) -> Path:
    """The demo teacher's tokenizer files alone (no config.json, no weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO / "models" / "teacher" / name, folder / name)
    return folder


def rationale_items(path: Path, n: int = 40) -> Path:
    """The demo's first `n` questions, each with an explanation (token-level targets)."""
    rows = [json.loads(line) for line in (DEMO / "iteration_1.jsonl").read_text().splitlines()[:n]]
    for r in rows:
        r["explanation"] = f"{r['options'][r['answer_idx']]} is the one that fits."
    write_jsonl(path, rows)
    return path


# ------------------------------------------------------------------ fast: the store's rows

def test_short_rows_are_filled_with_distinct_unused_ids_at_no_mass():
    rec = {"ids": [[5, 3, 0], [7, 1]], "logprobs": [[-0.1, -2.5, -3.0], [-0.2, -2.0]], "tail": [-4.0, -3.5]}
    ids, logp, tail = padded_rows(rec, 4)
    assert ids.tolist() == [[5, 3, 0, 1], [7, 1, 0, 2]]  # the lowest ids the row does not hold
    assert logp[0, :3].tolist() == pytest.approx([-0.1, -2.5, -3.0]) and logp[0, 3] == -math.inf
    assert logp[1, 2:].tolist() == [-math.inf, -math.inf] and tail.tolist() == [-4.0, -3.5]
    assert padded_rows({"key": "T:x", "off": "not aligned"}, 4) is None


# ------------------------------------------------------------------ against llama.cpp

@pytest.mark.e2e
def test_the_served_demo_models_tokenize_as_transformers_does(served_demo):  # noqa: F811
    """The GGUFs were told GPT-2's pre-tokenizer: the server's ids equal transformers' on the demo's rendered
    prompts and on rationale replies (what step E has it re-tokenize)."""
    import urllib.request

    from atkd.models import load_tokenizer
    from atkd.prompts import mcq_prompt
    from atkd.records import load_questions

    questions = load_questions(str(DEMO / "eval.jsonl"))[:60]
    for name, server in served_demo.items():
        tok = load_tokenizer(DEMO / "models" / name)
        texts = [mcq_prompt(tok, q, "en") + q.answer_idx + f"\n{q.options[q.answer_idx]} is the one that fits."
                 for q in questions]
        for text in texts:
            body = json.dumps({"input": text, "add_special": True, "special": True}).encode()
            req = urllib.request.Request(server.base.removesuffix("/v1") + "/extras/tokenize", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                served = json.loads(resp.read())["tokens"]
            assert served == tok(text)["input_ids"], (name, text)


@pytest.mark.e2e
def test_served_step_e_gives_the_local_targets(served_demo, tmp_path):  # noqa: F811
    """Step E at the endpoint on the demo teacher's own weights: the same letters and token targets as the
    local forward pass, within llama.cpp's numerics; the store says what it asked and what it kept."""
    teacher = served_demo["teacher"]
    data = rationale_items(tmp_path / "items.jsonl")
    common = ["--dataset_path", str(data), "--response_field", "explanation"]
    run_stage("logits", "--model_path", str(DEMO / "models" / "teacher"), "--output_dir", str(tmp_path / "local"),
              *common)
    run_stage("logits", "--api_base", teacher.base, "--api_model", teacher.model, "--model_path",
              str(tokenizer_only(tmp_path / "tok")), "--output_dir", str(tmp_path / "served"), *common)
    local, served = LogitsStore.open(tmp_path / "local"), LogitsStore.open(tmp_path / "served")
    summary = read_json(tmp_path / "served" / "summary.json")
    assert summary["served"]["token_level_mode"] == "echo" and summary["served"]["top_logprobs"] == 20
    assert summary["token_level_items"] == 40 and summary["served"]["token_level_kept_option_level"] == 0
    worst_letter, overlaps, worst_token = 0.0, [], 0.0
    for key in local.items:
        a, b = served.option_logprobs(key), local.option_logprobs(key)
        assert a.argmax() == b.argmax()
        likely = b > math.log(1e-3)  # letters with real mass: inside every top-20
        worst_letter = max(worst_letter, (a - b)[likely].abs().max().item())
        ta, tb = served.token_level(key), local.token_level(key)
        assert torch.equal(ta[0], tb[0])  # the same training tokens
        for row_a, lp_a, row_b, lp_b in zip(ta[1], ta[2], tb[1], tb[2]):
            overlaps.append(len(set(row_a.tolist()) & set(row_b.tolist())) / len(row_b))
            mine = dict(zip(row_a.tolist(), lp_a.tolist()))
            worst_token = max([worst_token] + [abs(mine[i] - v) for i, v in zip(row_b.tolist(), lp_b.tolist())
                                               if i in mine and v > math.log(1e-3)])
    # llama.cpp keeps its KV cache in f16 by default: log-probs agree to a few hundredths of a nat
    assert worst_letter < 0.05 and worst_token < 0.1
    assert sum(overlaps) / len(overlaps) > 0.9

    # no tokenizer at all: option-level targets only, and train.py takes the store
    run_stage("logits", "--api_base", teacher.base, "--api_model", teacher.model, "--model_path", "",
              "--output_dir", str(tmp_path / "bare"), *common)
    bare = read_json(tmp_path / "bare" / "summary.json")
    assert bare["token_level_items"] == 0 and "no teacher tokenizer" in bare["served"]["token_level_why_none"]
    assert LogitsStore.open(tmp_path / "bare").index["tokenizer_fingerprint"] is None
    run_stage("train", "--student_model_path", str(DEMO / "models" / "student"), "--train_file_path", str(data),
              "--teacher_logits_dir", str(tmp_path / "bare"), "--output_dir", str(tmp_path / "student"), "--check_only")


@pytest.mark.e2e
def test_served_step_e_cut_short_resumes_to_the_uninterrupted_store(served_demo, tmp_path, monkeypatch):  # noqa: F811
    """A run that dies after some answers keeps them; the rerun asks only the rest and writes the store an
    uninterrupted run writes."""
    from atkd import api as api_module
    from atkd import teacher_logits
    from atkd.teacher_logits import LogitsConfig

    teacher = served_demo["teacher"]
    data = rationale_items(tmp_path / "items.jsonl", n=24)

    def cfg(out: str) -> LogitsConfig:
        return LogitsConfig(api_base=teacher.base, api_model=teacher.model, api_concurrency=2,
                            model_path=str(tokenizer_only(tmp_path / "tok")), dataset_path=str(data),
                            output_dir=str(tmp_path / out), response_field="explanation", shard_size=10)

    teacher_logits.run(cfg("whole"))
    real = api_module.ChatAPI.post_each

    def dies_after_ten(self, path, payloads):
        for n, answer in enumerate(real(self, path, payloads)):
            if n == 10 and path == "/completions":
                raise APIError("the server went away")
            yield answer

    monkeypatch.setattr(api_module.ChatAPI, "post_each", dies_after_ten)
    with pytest.raises(APIError, match="went away"):
        teacher_logits.run(cfg("cut"))
    assert not (tmp_path / "cut" / "index.json").exists()
    monkeypatch.setattr(api_module.ChatAPI, "post_each", real)
    asked = []
    monkeypatch.setattr(api_module.ChatAPI, "post_each",
                        lambda self, path, payloads: (asked.append(len(payloads)), real(self, path, payloads))[1])
    teacher_logits.run(cfg("cut"))
    assert asked == [1, 0, 14]  # the probe; no letter request again; the 14 token requests not answered before
    # The same store, up to the engine's own rounding: llama.cpp reuses the KV cache of the prompt prefix it
    # shares with the request before, so a value can move in the last bits with the order of the requests.
    whole, cut = LogitsStore.open(tmp_path / "whole"), LogitsStore.open(tmp_path / "cut")
    plain = ("shard", "letter_mass")
    assert {k: {f: v for f, v in e.items() if f not in plain} for k, e in whole.items.items()} == \
           {k: {f: v for f, v in e.items() if f not in plain} for k, e in cut.items.items()}
    for key in whole.items:
        assert whole.items[key]["letter_mass"] == pytest.approx(cut.items[key]["letter_mass"], abs=1e-5)
        assert torch.allclose(whole.option_logprobs(key), cut.option_logprobs(key), atol=1e-4)
        (ids_a, top_a, lp_a, tail_a), (ids_b, top_b, lp_b, tail_b) = whole.token_level(key), cut.token_level(key)
        assert torch.equal(ids_a, ids_b) and torch.equal(top_a[:, :5], top_b[:, :5])
        assert torch.allclose(lp_a[:, :5], lp_b[:, :5], atol=1e-3) and torch.allclose(tail_a, tail_b, atol=1e-3)


@pytest.mark.e2e
def test_served_models_answer_in_score_mode_and_fall_back_to_generate_without_logprobs(served_demo, tmp_path):  # noqa: F811
    """The teacher's evaluation at the endpoint scores by the letters' log-probs, like the local score mode; a
    server that gives no log-probs (llama.cpp without logits_all) is asked in generate mode, and the log says so."""
    from served_llama import llama_cpp_server

    teacher = served_demo["teacher"]
    data = DEMO / "eval.jsonl"
    run_stage("answer", "--model_path", str(DEMO / "models" / "teacher"), "--dataset_path", str(data),
              "--output_path", str(tmp_path / "local" / "replies.jsonl"))
    served = run_stage("answer", "--api_base", teacher.base, "--api_model", teacher.model, "--dataset_path", str(data),
                       "--output_path", str(tmp_path / "served" / "replies.jsonl"))
    assert "score mode" in served.stderr
    local_replies = [json.loads(x) for x in (tmp_path / "local" / "replies.jsonl").read_text().splitlines()]
    served_replies = [json.loads(x) for x in (tmp_path / "served" / "replies.jsonl").read_text().splitlines()]
    assert [r["pred_letter"] for r in served_replies] == [r["pred_letter"] for r in local_replies]
    assert all(r["mode"] == "score" and r["option_probs"] for r in served_replies)

    with llama_cpp_server(teacher.gguf, teacher.model_dir, tmp_path, alias="nologits",
                          extra_args=("--logits_all", "False")) as plain:
        few = tmp_path / "few.jsonl"
        few.write_text("".join(data.read_text().splitlines(keepends=True)[:6]))
        fell_back = run_stage("answer", "--api_base", plain.base, "--api_model", plain.model, "--dataset_path",
                              str(few), "--output_path", str(tmp_path / "plain" / "replies.jsonl"),
                              "--api_max_attempts", "1", "--max_new_tokens", "16")
        # a served teacher whose folder also holds its weights: they answer in score mode instead
        local_instead = run_stage("answer", "--api_base", plain.base, "--api_model", plain.model, "--model_path",
                                  str(DEMO / "models" / "teacher"), "--dataset_path", str(few), "--output_path",
                                  str(tmp_path / "instead" / "replies.jsonl"), "--api_max_attempts", "1")
    assert "gives no letter log-probs, so it answers in generate mode" in fell_back.stderr
    assert read_json(tmp_path / "plain" / "summary.json")["mode"] == "generate"
    assert "answers in score mode instead" in local_instead.stderr
    instead = read_json(tmp_path / "instead" / "summary.json")
    assert instead["mode"] == "score" and instead["api_model"] is None

    # labelling scores the served teacher the same way: the same paths as the local teacher's
    labels = {}
    for where, model in (("local", ["--model_path", str(DEMO / "models" / "teacher")]),
                         ("served", ["--api_base", teacher.base, "--api_model", teacher.model])):
        run_stage("label", *model, "--ability_tree_path", str(ROOT / "ability_trees" / "demo_tree.json"),
                  "--dataset_path", str(few), "--output_path", str(tmp_path / where / "labels.jsonl"))
        labels[where] = [json.loads(x)["ability_path"] for x in (tmp_path / where / "labels.jsonl").read_text().splitlines()]
    assert labels["served"] == labels["local"] and len(labels["local"]) == 6


@pytest.mark.e2e
def test_main_with_the_teacher_and_agents_served_killed_and_resumed(served_demo, tmp_path):  # noqa: F811
    """main.py on the demo with the teacher and both agents at llama.cpp endpoints and only the student local
    (the teacher's folder holds its tokenizer alone): killed while the served teacher writes questions,
    rerun to the end."""
    teacher, agent = served_demo["teacher"], served_demo["agent"]
    cmd = [sys.executable, str(ROOT / "main.py"), "--workflow_output_dir", str(tmp_path / "workflow"),
           "--models_output_dir", str(tmp_path / "models"), "--num_iterations", "1",
           "--dataset_files_per_iteration", str(DEMO / "iteration_1.jsonl"),
           "--ability_class_files_per_iteration", str(DEMO / "iteration_1_ability_paths.jsonl"),
           "--num_distill_samples", "60", "--train_epochs", "1", "--gpus_to_use", "",
           "--eval_dataset_path", "", "--eval_ability_class_path", "",  # the served evaluation: tested above
           "--teacher_model_path", str(tokenizer_only(tmp_path / "teacher_tokenizer")),
           "--teacher_api_base", teacher.base, "--teacher_api_model", teacher.model,
           "--agent_model_1_path", "", "--agent_1_api_base", teacher.base, "--agent_1_api_model", teacher.model,
           "--agent_model_2_path", "", "--agent_2_api_base", agent.base, "--agent_2_api_model", agent.model]
    parts = tmp_path / "workflow" / "iteration_1" / "C_distill_data" / "generated.jsonl.parts"
    killed_when(cmd, lambda: parts_written(parts), env())
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "[resume] C_distill_data" in rerun.stdout
    assert "step E uses only the tokenizer" in rerun.stdout
    it = tmp_path / "workflow" / "iteration_1"
    report = read_json(tmp_path / "workflow" / "report.json")["iterations"][0]
    assert {row["mode"] for row in report["agents"].values()} == {"score"}  # both served agents scored
    store = read_json(it / "E_teacher_logits" / "summary.json")
    assert store["served"]["model"] == "teacher" and store["n"] > 0
    assert (tmp_path / "models" / "iteration_1_student_model" / "final_model").is_dir()
