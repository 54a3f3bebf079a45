"""Serving engines: main.py with the teacher and an agent behind a real `transformers serve`; an endpoint
agent (generate mode) beside a local scoring agent, killed and resumed per answer; the client's bounded
concurrency, timeouts and retries."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from atkd.api import APIError, ChatAPI
from atkd.errors import InputError
from atkd.io import parts_dir_for, write_jsonl
from atkd.paths import agent_answers_path, rejected_path, summary_path
from conftest import (ROOT, free_port, main_in_process, make_questions, run_script, send_chat_reply, served_requests, tail,
                      transformers_serve)

DEMO = ROOT / "data" / "demo"
LOCAL = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


def env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                PYTHONPATH=str(ROOT), **LOCAL, **extra)


# ------------------------------------------------------------------ main.py against transformers serve

def same_path(given: str, expected: Path) -> bool:
    """main.py's default model paths are relative to the repository root."""
    return (ROOT / given).resolve() == expected.resolve()


def sampling_copy(model_dir: Path, dest: Path) -> Path:
    """The model folder with a generation config that samples, as real instruct checkpoints ship
    (`transformers serve` samples only when the checkpoint's generation config says so; a request's
    temperature alone does not switch sampling on, and greedy replies would all be the same question)."""
    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "generation_config.json").read_text(encoding="utf-8"))
    config.update(do_sample=True, top_k=0, top_p=0.95)
    (dest / "generation_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return dest


@pytest.mark.e2e
def test_main_with_the_teacher_and_agent_1_behind_transformers_serve(tmp_path):
    served_teacher = sampling_copy(DEMO / "models" / "teacher", tmp_path / "served_teacher")
    with transformers_serve(served_teacher, tmp_path) as server:
        cmd = [sys.executable, str(ROOT / "main.py"), "--workflow_output_dir", str(tmp_path / "workflow"),
               "--models_output_dir", str(tmp_path / "models"), "--num_iterations", "1",
               "--dataset_files_per_iteration", str(DEMO / "iteration_1.jsonl"),
               "--ability_class_files_per_iteration", str(DEMO / "iteration_1_ability_paths.jsonl"),
               "--num_distill_samples", "20", "--train_epochs", "1", "--gpus_to_use", "",
               "--eval_dataset_path", "", "--eval_ability_class_path", "",  # a served evaluation: test_served_teacher
               "--teacher_api_base", server["base"], "--teacher_api_model", server["model"],
               "--agent_1_api_base", server["base"], "--agent_1_api_model", server["model"],
               "--api_key_env", "ATKD_TEST_KEY", "--api_concurrency", "4"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env(ATKD_TEST_KEY="not-a-secret"), cwd=ROOT,
                              timeout=1200)
        answered = served_requests(server)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + tail(server["err"])
    it1 = tmp_path / "workflow" / "iteration_1"
    report = json.loads((tmp_path / "workflow" / "report.json").read_text(encoding="utf-8"))
    (entry,) = report["iterations"]
    assert entry["generated"] > 0 and 0 < entry["validated"] <= entry["generated"]
    assert entry["final_model"]
    # The mode is per agent: the served agent generated, the local one scored by logits.
    agents = entry["agents"]
    assert agents["agent_1"]["mode"] == "generate" and agents["agent_1"]["model"] == f"{server['model']} @ {server['base']}"
    assert agents["agent_2"]["mode"] == "score" and same_path(agents["agent_2"]["model"], DEMO / "models" / "agent")
    assert "agent 1 " in (tmp_path / "workflow" / "report.md").read_text(encoding="utf-8")
    d_report = json.loads(summary_path(it1 / "D_validated_data" / "validated.jsonl").read_text(encoding="utf-8"))
    assert d_report["agents"]["agent_1"]["mean_letter_mass"] is None  # no logits from an endpoint
    assert d_report["agents"]["agent_2"]["mean_letter_mass"] is not None
    # Every question was written and every item answered by agent 1 at the server, one request each, and two
    # stages asked once whether the server gives log-probs (D's agent 1, E): it does not.
    plan = json.loads(summary_path(it1 / "C_distill_data" / "generated.jsonl").read_text(encoding="utf-8"))
    assert answered == plan["attempts"] + d_report["total"] + 2
    records = [json.loads(x) for x in (it1 / "C_distill_data" / "generated.jsonl").read_text().splitlines()]
    assert {r["teacher"] for r in records} == {server["model"]}
    # E asked the server, which gives no log-probs (transformers serve): the teacher's local weights gave them.
    commands = {line.split()[1].rstrip(":"): shlex.split(nxt[4:]) for line, nxt in
                zip(proc.stdout.splitlines(), proc.stdout.splitlines()[1:]) if line.startswith("[run] ")}
    c_cmd, e_cmd = commands["C_distill_data"], commands["E_teacher_logits"]
    assert c_cmd[c_cmd.index("--api_base") + 1] == server["base"] and "--teacher_model_path" not in c_cmd
    assert same_path(e_cmd[e_cmd.index("--model_path") + 1], DEMO / "models" / "teacher")
    summary = json.loads((it1 / "E_teacher_logits" / "summary.json").read_text(encoding="utf-8"))
    assert "served" not in summary  # the store came from the local forward passes
    assert summary["n"] == entry["validated"] + entry["replay"]["replay"]  # E also scores D2's replayed questions


def main_args(base: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), "--workflow_output_dir", str(base / "workflow"),
            "--models_output_dir", str(base / "models"), "--gpus_to_use", "", *extra]


def test_main_plans_the_endpoints_and_refuses_bad_endpoint_settings(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    plan = main_in_process(main_args(tmp_path, "--dry_run", "--existing_ability_tree_path", "",
                                     "--teacher_api_base", url, "--teacher_api_model", "big",
                                     "--agent_2_api_base", url, "--agent_2_api_model", "other",
                                     "--agent_model_2_path", "")[2:], env())
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    # Each step's command runs its stage as `python -m atkd <stage>`: keyed here by the stage's script alias.
    stages = {"tree": "create_initial_tree.py", "write_questions": "generate_distill_data.py",
              "cross_check": "evaluate_distilled_data.py", "logits": "generate_logits.py"}
    command = {script: shlex.split(line.strip()) for line in lines for stage, script in stages.items()
               if f" -m atkd {stage} " in line}
    for script in ("create_initial_tree.py", "generate_distill_data.py"):
        cmd = command[script]
        assert cmd[cmd.index("--api_base") + 1] == url and cmd[cmd.index("--api_model") + 1] == "big"
    d = command["evaluate_distilled_data.py"]
    assert d[d.index("--agent_2_api_base") + 1] == url and "--agent_model_2_path" not in d
    assert same_path(d[d.index("--agent_model_1_path") + 1], DEMO / "models" / "teacher")
    # E asks the served teacher for its log-probs; TEACHER_MODEL_PATH is only its tokenizer there
    e = command["generate_logits.py"]
    assert e[e.index("--api_base") + 1] == url and e[e.index("--api_model") + 1] == "big"
    assert same_path(e[e.index("--model_path") + 1], DEMO / "models" / "teacher")
    # the teacher's evaluation is answered at its endpoint too; the student's stays local
    answers = [shlex.split(line.strip()) for line in lines if " -m atkd answer " in line]
    teacher_eval = [a for a in answers if "teacher_eval" in a[a.index("--output_path") + 1]]
    assert len(teacher_eval) == 1 and teacher_eval[0][teacher_eval[0].index("--api_base") + 1] == url
    assert same_path(teacher_eval[0][teacher_eval[0].index("--model_path") + 1], DEMO / "models" / "teacher")
    assert all("--api_base" not in a for a in answers if a not in teacher_eval)

    for extra, problem in (
            (["--teacher_api_base", url], "TEACHER_API_BASE needs TEACHER_API_MODEL"),
            (["--teacher_api_base", url, "--teacher_api_model", "big"],
             f"error: {url}: no OpenAI-compatible server answers there"),
            (["--teacher_api_base", url, "--teacher_api_model", "big", "--teacher_model_path", str(tmp_path)],
             f"error: {tmp_path}: no tokenizer files here")):
        res = main_in_process(main_args(tmp_path, *extra)[2:], env())
        assert res.returncode == 2 and problem in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not (tmp_path / "workflow").exists() and not (tmp_path / "models").exists()


# ------------------------------------------------------------------ an endpoint agent, killed and resumed

class ScriptedAgent(ThreadingHTTPServer):
    """An OpenAI-compatible endpoint answering "Answer: X" with X fixed by the question text (so any rerun
    gets the same reply). From request number `block_at` on, requests are held unanswered."""

    daemon_threads = True

    def __init__(self, port: int, block_at: int | None = None):
        super().__init__(("127.0.0.1", port), _AgentHandler)  # one port for every run: the URL is in the report
        self.count, self.lock = 0, threading.Lock()
        self.block_at = block_at
        self.release = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class _AgentHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (/v1/models: the stage's reachability check)
        send_chat_reply(self, "")

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.count += 1
            number = self.server.count
        if self.server.block_at is not None and number >= self.server.block_at:
            self.server.release.wait(60)
            return
        prompt = body["messages"][0]["content"]
        letter = "ABCD"[hashlib.sha256(prompt.encode()).digest()[0] % 4]
        send_chat_reply(self, f"Let me think.\nAnswer: {letter}")

    def log_message(self, *args):
        pass


def validate_args(data: Path, out: Path, url: str, agent_2: Path) -> list[str]:
    return ["--input_file", str(data), "--output_file", str(out), "--agent_1_api_base", url,
            "--agent_1_api_model", "served-agent", "--agent_model_2_path", str(agent_2), "--batch_size", "8",
            "--api_concurrency", "2"]


@pytest.mark.e2e
def test_endpoint_agent_generates_beside_a_scoring_agent_and_resumes_per_answer(tmp_path, llama_dir):
    rows = make_questions(20, seed=3, id_prefix="g")
    write_jsonl(tmp_path / "gen.jsonl", rows)
    whole, cut = tmp_path / "whole" / "validated.jsonl", tmp_path / "cut" / "validated.jsonl"
    port = free_port()
    server = ScriptedAgent(port)
    res = run_script("evaluate_distilled_data.py", *validate_args(tmp_path / "gen.jsonl", whole, server.url, llama_dir),
                     env=env())
    server.close()
    assert res.returncode == 0, res.stderr
    assert server.count == 1 + 20  # one request tells its server gives no log-probs (it then generates)
    report = json.loads(summary_path(whole).read_text(encoding="utf-8"))
    assert report["agents"]["agent_1"]["mode"] == "generate" and report["agents"]["agent_2"]["mode"] == "score"
    assert report["agents"]["agent_1"]["unparsed"] == 0 and report["agents"]["agent_2"]["mean_label_prob"] > 0

    # SIGKILL while requests 13 and 14 are in flight (after the probe): 11 answers are logged, not a whole batch
    # of 8 more.
    parts = parts_dir_for(agent_answers_path(cut, 1))

    def logged() -> int:
        return sum(len(p.read_text(encoding="utf-8").splitlines()) for p in parts.glob("part-*.jsonl"))

    server = ScriptedAgent(port, block_at=13)
    proc = subprocess.Popen([sys.executable, str(ROOT / "evaluate_distilled_data.py"),
                             *validate_args(tmp_path / "gen.jsonl", cut, server.url, llama_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    try:
        deadline = time.monotonic() + 240
        while (logged() < 11 or server.count < 14) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before the kill point"
            time.sleep(0.05)
        proc.kill()
        proc.wait(60)
    finally:
        server.close()
    assert logged() == 11 and server.count == 14 and not cut.exists()

    server = ScriptedAgent(port)
    res = run_script("evaluate_distilled_data.py", *validate_args(tmp_path / "gen.jsonl", cut, server.url, llama_dir),
                     env=env())
    server.close()
    assert res.returncode == 0, res.stderr
    assert server.count == 1 + 20 - 11  # the probe, then only the answers not logged
    assert "agent 1: 11 of 20 replies already written by an earlier run" in res.stderr
    for path in (whole, rejected_path(whole), summary_path(whole)):
        assert (cut.parent / path.name).read_bytes() == path.read_bytes(), path.name


# ------------------------------------------------------------------ the client: concurrency, timeouts, retries

class Flaky(ThreadingHTTPServer):
    """Answers after `delay_s`; fails the first `fail_first` requests with `status`; records the most
    requests it ever had in flight at once."""

    daemon_threads = True

    def __init__(self, delay_s: float = 0.0, fail_first: int = 0, status: int = 503):
        super().__init__(("127.0.0.1", 0), _FlakyHandler)
        self.delay_s, self.fail_first, self.status = delay_s, fail_first, status
        self.count = self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _FlakyHandler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv = self.server
        with srv.lock:
            srv.count += 1
            number = srv.count
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        time.sleep(srv.delay_s)
        # Counted out before the reply is sent: once the client has the reply it may send its next request, and
        # that one must not find this one still counted.
        with srv.lock:
            srv.in_flight -= 1
        try:
            if number <= srv.fail_first:
                self.send_error(srv.status)
            else:
                send_chat_reply(self, "reply to " + body["messages"][0]["content"])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on this request (timeout)

    def log_message(self, *args):
        pass


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for key, value in LOCAL.items():
        monkeypatch.setenv(key, value)


def test_at_most_concurrency_requests_in_flight_and_replies_in_input_order():
    server = Flaky(delay_s=0.2)
    try:
        api = ChatAPI(server.url, "m", concurrency=3)
        texts = [f"q{i}" for i in range(10)]
        assert api.chat_many(texts, 8) == [f"reply to q{i}" for i in range(10)]
        assert server.max_in_flight == 3
        arrived = [i for i, _ in api.chat_each([(t, None) for t in texts], 8)]
        assert sorted(arrived) == list(range(10))
    finally:
        server.close()


def test_retryable_failures_are_retried_with_backoff_others_fail_at_once():
    server = Flaky(fail_first=2, status=503)
    try:
        start = time.monotonic()
        assert ChatAPI(server.url, "m", max_attempts=3).chat("x", 8) == "reply to x"
        assert server.count == 3 and time.monotonic() - start >= 1.0 + 2.0  # waited 1 s, then 2 s
    finally:
        server.close()
    server = Flaky(fail_first=5, status=400)
    try:
        with pytest.raises(APIError, match="HTTP 400"):
            ChatAPI(server.url, "m", max_attempts=4).chat("x", 8)
        assert server.count == 1  # a bad request is not retried
    finally:
        server.close()


def test_a_request_past_its_timeout_is_retried_then_the_stage_fails():
    server = Flaky(delay_s=1.5)
    try:
        with pytest.raises(APIError, match="after 2 tries"):
            ChatAPI(server.url, "m", timeout_s=0.3, max_attempts=2).chat("x", 8)
        assert server.count == 2
    finally:
        server.close()


def test_an_address_where_nothing_listens_is_bad_input():
    with pytest.raises(InputError, match="no OpenAI-compatible server answers there"):
        ChatAPI(f"http://127.0.0.1:{free_port()}/v1", "m").check_reachable()
