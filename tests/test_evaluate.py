"""evaluate_distilled_data.py and atkd.cross_check: two agents, verdicts, report, resume, bad input."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from atkd.answering import Answerer
from atkd.cross_check import same_model, verdict
from atkd.io import parts_dir_for, write_jsonl
from atkd.models import load_model, load_tokenizer
from atkd.paths import agent_answers_path, rejected_path, summary_path
from atkd.records import question_from_dict
from atkd.scoring import score_questions
from conftest import make_questions, run_script, send_chat_reply

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # see tests/test_generate_distill.py
LEAVES = [["Med", "Cardio", "Valves"], ["Med", "Pharm"]]


pytestmark = pytest.mark.usefixtures("one_thread")  # every test: torch on one thread (conftest)


def generated(n: int = 24) -> list[dict]:
    """Generated-looking items: string ids, an ability path, labels cycling A-D."""
    rows = make_questions(n, seed=5)
    for i, r in enumerate(rows):
        r.update(id=f"it1-{i % 2}-{i}", ability_path=LEAVES[i % 2], answer_idx="ABCD"[i % 4])
    return rows


def own_answers(model_dir: Path, rows: list[dict]) -> dict[str, tuple[str, float]]:
    """What one model answers on its own: {id: (pred letter, probability of the label)}."""
    tok, model = load_tokenizer(model_dir), load_model(model_dir)
    qs = [question_from_dict(r) for r in rows]
    out = {}
    score_questions(model, tok, qs, "en", 8, lambda pairs: out.update(
        {q.key: (s.pred_letter, s.probs()[q.answer_idx]) for q, s in pairs}))
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def evaluate(run, data: Path, out: Path, agent_1, agent_2, *extra):
    return run("evaluate_distilled_data.py", "--agent_model_1_path", agent_1, "--agent_model_2_path", agent_2,
               "--input_file", data, "--output_file", out, "--batch_size", 8, *extra, env=ONE_THREAD)


@pytest.fixture(scope="module")
def two_agents(tmp_path_factory, llama_dir, qwen_plain_dir):
    """One uninterrupted run with two different tiny agents: (input file, validated path, stderr)."""
    folder = tmp_path_factory.mktemp("two_agents")
    write_jsonl(folder / "gen.jsonl", generated())
    out = folder / "D" / "validated.jsonl"
    res = evaluate(run_script, folder / "gen.jsonl", out, llama_dir, qwen_plain_dir)
    assert res.returncode == 0, res.stderr
    return folder / "gen.jsonl", out, res.stderr


def test_two_agents_are_two_models_and_both_are_reported(two_agents, llama_dir, qwen_plain_dir):
    """Each agent's answers are its own model's (the reference ran the teacher twice and called it two agents)."""
    rows = generated()
    _, out, stderr = two_agents
    assert "same model" not in stderr
    kept, rejected = read_jsonl(out), read_jsonl(rejected_path(out))
    report = json.loads(summary_path(out).read_text(encoding="utf-8"))
    assert len(kept) + len(rejected) == len(rows)

    first, second = own_answers(llama_dir, rows), own_answers(qwen_plain_dir, rows)
    by_id = {str(r["id"]): r for r in kept + rejected}
    for row in rows:
        rec = by_id[row["id"]]
        assert rec["agent_1_pred"] == first[row["id"]][0] and rec["agent_2_pred"] == second[row["id"]][0]
        assert rec["agent_1_label_prob"] == pytest.approx(first[row["id"]][1], abs=1e-5)
        want = verdict(row["answer_idx"], first[row["id"]][0], second[row["id"]][0])
        assert rec.get("reject_reason") == want
    # The two tiny models answer differently, so the verdicts show each agent on its own.
    assert any(first[k][0] != second[k][0] for k in first)
    assert report["same_model"] is False
    assert report["agents"]["agent_1"]["model"] == str(llama_dir)
    assert report["agents"]["agent_2"]["model"] == str(qwen_plain_dir)
    counts = {r: sum(x["reject_reason"] == r for x in rejected) for r in report["by_reason"]}
    assert report["by_reason"] == counts and {"agent_1_wrong", "agent_2_wrong"} <= {r for r, c in counts.items() if c}
    assert report["kept"] == len(kept) and report["total"] == 24
    assert {k: v["total"] for k, v in report["by_leaf"].items()} == {"Med > Cardio > Valves": 12, "Med > Pharm": 12}
    assert not parts_of(out, 1).exists() and not parts_of(out, 2).exists()


def parts_of(validated: Path, agent: int) -> Path:
    return parts_dir_for(agent_answers_path(validated, agent))


def test_same_model_twice_is_flagged_and_min_confidence_applies(tmp_path, run, llama_dir):
    rows = generated()
    write_jsonl(tmp_path / "gen.jsonl", rows)
    copy = tmp_path / "llama_copy"  # a copy of the same weights in another folder is still one model
    shutil.copytree(llama_dir, copy)
    mine = own_answers(llama_dir, rows)
    right = sorted(mine[r["id"]][1] for r in rows if mine[r["id"]][0] == r["answer_idx"])
    assert len(right) >= 2 and right[0] < right[-1]
    threshold = (right[0] + right[-1]) / 2  # some right answers above it, some below

    out = tmp_path / "D" / "validated.jsonl"
    res = evaluate(run, tmp_path / "gen.jsonl", out, llama_dir, copy, "--min_confidence", threshold)
    assert res.returncode == 0, res.stderr
    assert "both agents are the same model" in res.stderr
    report = json.loads(summary_path(out).read_text(encoding="utf-8"))
    assert report["same_model"] is True and report["min_confidence"] == threshold
    kept = {r["id"] for r in read_jsonl(out)}
    want = {r["id"] for r in rows if mine[r["id"]][0] == r["answer_idx"] and mine[r["id"]][1] >= threshold}
    assert kept == want and kept
    low = {r["id"] for r in read_jsonl(rejected_path(out)) if r["reject_reason"] == "low_confidence"}
    assert low == {r["id"] for r in rows if mine[r["id"]][0] == r["answer_idx"]} - want and low


def test_same_model_detection(tmp_path, llama_dir, qwen_plain_dir):
    a = Answerer(model_path=str(llama_dir))
    assert same_model(a, Answerer(model_path=f"{llama_dir.parent}/./{llama_dir.name}"))
    copy = tmp_path / "copy"  # the same contents in another folder: one model
    shutil.copytree(llama_dir, copy)
    assert same_model(a, Answerer(model_path=str(copy)))
    assert not same_model(a, Answerer(model_path=str(qwen_plain_dir)))
    retrained = tmp_path / "retrained"  # same names and sizes, other weights: another model
    shutil.copytree(llama_dir, retrained)
    weights = bytearray((retrained / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (retrained / "model.safetensors").write_bytes(bytes(weights))
    assert not same_model(a, Answerer(model_path=str(retrained)))
    assert not same_model(Answerer(api_base="http://h/v1", api_model="m"),
                          Answerer(api_base="http://h/v1/", api_model="n"))
    assert same_model(Answerer(api_base="http://h/v1", api_model="m"),
                      Answerer(api_base="http://h/v1/", api_model="m"))


def test_second_agent_crash_keeps_the_first_agents_answers(tmp_path, run, two_agents, llama_dir, qwen_plain_dir):
    data, fresh, _ = two_agents
    broken = tmp_path / "broken"
    shutil.copytree(qwen_plain_dir, broken)
    # Weights that pass the upfront header check but do not fit the config: loading fails in the worker.
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] + 8}))
    out = tmp_path / "D" / "validated.jsonl"
    res = evaluate(run, data, out, llama_dir, broken)
    assert res.returncode not in (0, 2) and not out.exists()
    assert sum(len(p.read_text().splitlines()) for p in parts_of(out, 1).glob("part-*.jsonl")) == 24

    res = evaluate(run, data, out, llama_dir, qwen_plain_dir)
    assert res.returncode == 0, res.stderr
    assert "agent 1: 24 of 24 answers already written" in res.stderr
    assert out.read_bytes() == fresh.read_bytes()  # the same as the uninterrupted run
    assert rejected_path(out).read_bytes() == rejected_path(fresh).read_bytes()
    assert summary_path(out).read_bytes() == summary_path(fresh).read_bytes()
    assert not parts_of(out, 1).exists()


# ------------------------------------------------------------------ generate mode

REPLIES = {  # (agent model, question marker) -> reply
    ("agent-a", "TRAP"): "Aspirin Blocks Cyclooxygenase, so Bleeding Could Develop.",
    ("agent-b", "TRAP"): "Aspirin Blocks Cyclooxygenase. Answer: A",
    ("agent-a", "OK"): "Because Digoxin Blocks the pump, Bradycardia follows. The answer is C.",
    ("agent-b", "OK"): "Answer: C",
    ("agent-a", "WRONG"): "Answer: C",
    ("agent-b", "WRONG"): "Cardiac Output matters; the answer is (B).",
}


class FakeAgents(ThreadingHTTPServer):
    """One OpenAI-compatible endpoint serving two scripted "models" (stands in for vLLM etc.)."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _AgentHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _AgentHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][0]["content"]
        marker = next(m for m in ("TRAP", "OK", "WRONG") if m in prompt)
        send_chat_reply(self, REPLIES[(body["model"], marker)])

    def log_message(self, *args):
        pass


def test_generate_mode_never_reads_a_capital_inside_a_word(tmp_path, run):
    """Only a committed letter counts (the reference took any capital letter anywhere in the reply as the answer)."""
    opts = {"A": "aspirin", "B": "heparin", "C": "digoxin", "D": "insulin"}
    rows = [{"id": "t", "question": "TRAP: which drug?", "options": opts, "answer_idx": "A", "ability_path": ["Med"]},
            {"id": "o", "question": "OK: which drug?", "options": opts, "answer_idx": "C", "ability_path": ["Med"]},
            {"id": "w", "question": "WRONG: which drug?", "options": opts, "answer_idx": "C", "ability_path": ["Med"]}]
    write_jsonl(tmp_path / "gen.jsonl", rows)
    server = FakeAgents()
    out = tmp_path / "D" / "validated.jsonl"
    env = dict(ONE_THREAD, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    res = run("evaluate_distilled_data.py", "--mode", "generate", "--input_file", tmp_path / "gen.jsonl",
              "--output_file", out, "--agent_1_api_base", server.url, "--agent_1_api_model", "agent-a",
              "--agent_2_api_base", server.url, "--agent_2_api_model", "agent-b", env=env)
    server.shutdown()
    server.server_close()
    assert res.returncode == 0, res.stderr
    kept, rejected = read_jsonl(out), {r["id"]: r for r in read_jsonl(rejected_path(out))}
    assert [r["id"] for r in kept] == ["o"] and kept[0]["agent_1_pred"] == kept[0]["agent_2_pred"] == "C"
    assert rejected["t"]["reject_reason"] == "unparsed" and rejected["t"]["agent_1_pred"] is None
    assert rejected["t"]["agent_2_pred"] == "A"
    assert rejected["w"]["reject_reason"] == "agent_2_wrong" and rejected["w"]["agent_2_pred"] == "B"
    report = json.loads(summary_path(out).read_text(encoding="utf-8"))
    assert report["agents"]["agent_1"]["mode"] == report["agents"]["agent_2"]["mode"] == "generate"
    assert report["same_model"] is False
    assert report["agents"]["agent_1"]["unparsed"] == 1 and report["by_leaf"]["Med"] == {
        "total": 3, "kept": 1, "pass_rate": 0.3333, "rejected": {"agent_2_wrong": 1, "unparsed": 1}}


def test_generate_mode_with_local_tiny_models(tmp_path, run, llama_dir, qwen_plain_dir):
    rows = generated(8)
    write_jsonl(tmp_path / "gen.jsonl", rows)
    out = tmp_path / "D" / "validated.jsonl"
    res = evaluate(run, tmp_path / "gen.jsonl", out, llama_dir, qwen_plain_dir, "--mode", "generate",
                   "--max_new_tokens", 6)
    assert res.returncode == 0, res.stderr
    report = json.loads(summary_path(out).read_text(encoding="utf-8"))
    rejected = read_jsonl(rejected_path(out))
    assert report["kept"] + sum(report["by_reason"].values()) == 8 == report["total"]
    assert all("agent_1_reply" in r and "agent_2_reply" in r for r in rejected if r["reject_reason"] == "unparsed")


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("extra,problem", [
    (["--mode", "generate", "--min_confidence", "0.5"], "--min_confidence needs --mode score"),
    (["--agent_1_api_base", "http://127.0.0.1:9/v1"], "--agent_1_api_base needs --agent_1_api_model"),
    (["--agent_1_api_base", "http://127.0.0.1:9/v1", "--agent_1_api_model", "m"],
     "error: http://127.0.0.1:9/v1: no OpenAI-compatible server answers there"),
    (["--min_confidence", "1.5"], "error: --min_confidence must be between 0.0 and 1.0 (got 1.5)"),
])
def test_bad_settings_exit_2_without_output(tmp_path, run, llama_dir, extra, problem):
    write_jsonl(tmp_path / "gen.jsonl", generated(4))
    out = tmp_path / "D" / "validated.jsonl"
    res = evaluate(run, tmp_path / "gen.jsonl", out, llama_dir, llama_dir, *extra)
    assert res.returncode == 2 and problem in res.stderr and "Traceback" not in res.stderr
    assert not out.parent.exists()


def test_bad_inputs_exit_2_with_file_and_line(tmp_path, run, llama_dir):
    rows = generated(4)
    rows[2]["answer_idx"] = "F"
    write_jsonl(tmp_path / "gen.jsonl", rows)
    out = tmp_path / "D" / "validated.jsonl"
    res = evaluate(run, tmp_path / "gen.jsonl", out, llama_dir, tmp_path / "missing")
    assert res.returncode == 2 and f"error: {tmp_path / 'gen.jsonl'}:3: answer_idx 'F'" in res.stderr
    write_jsonl(tmp_path / "gen.jsonl", generated(4))
    res = evaluate(run, tmp_path / "gen.jsonl", out, llama_dir, tmp_path / "missing")
    assert res.returncode == 2 and "model folder not found" in res.stderr
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    res = evaluate(run, tmp_path / "empty.jsonl", out, llama_dir, llama_dir)
    assert res.returncode == 2 and "no questions to validate" in res.stderr
    assert not out.parent.exists()
    assert run("evaluate_distilled_data.py", "--help").returncode == 0
