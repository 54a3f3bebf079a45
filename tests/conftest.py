"""Shared fixtures: tiny real models built from a locally trained tokenizer, MCQ data, a CLI runner."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from atkd.io import write_jsonl
from atkd.prompts import mcq_prompt, question_block
from atkd.records import question_from_dict
from atkd.tiny import build_model, save_model, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers run side by side, one per core: torch on one thread each, as every stage subprocess the tests start.
    import torch

    torch.set_num_threads(1)

# The files whose end-to-end tests take the longest (seconds of main.py runs on 2 cores), heaviest first. Run
# first, so that with one file per worker (pytest-xdist --dist loadfile) the short files fill in at the end
# instead of one worker idling while the other finishes a long file.
HEAVY_FILES = ("test_main.py", "test_quick_start.py", "test_on_policy.py", "test_serving.py", "test_byod.py",
               "test_served_teacher.py", "test_rationales.py", "test_served_logprobs.py", "test_train_scale.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FILES)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: the rest keep order


WORDS = ("heart lung liver kidney aspirin insulin metoprolol amoxicillin femur tibia nerve muscle virus "
         "bacteria fungus enzyme protein vein artery cell blood bone skin brain").split()


def make_questions(n: int, seed: int = 0, n_options: int = 4, id_prefix: str | None = None) -> list[dict]:
    """n synthetic four-option questions (valid records, deterministic from seed)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        letters = [chr(ord("A") + k) for k in range(n_options)]
        opts = rng.sample(WORDS, n_options)
        out.append({"id": f"{id_prefix}{i}" if id_prefix else i,
                    "question": f"Which of these is linked to the {rng.choice(WORDS)} and the {rng.choice(WORDS)}?",
                    "options": dict(zip(letters, opts)), "answer_idx": rng.choice(letters),
                    "meta_info": "synthetic"})
    return out


def corpus(questions: list[dict]) -> list[str]:
    texts = []
    for q in questions:
        texts.append(question_block(question_from_dict(q), "en", with_answer=True))
    return texts


def main_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """main.py's `main(argv)` in this process, from the repository root (its default paths are relative to it),
    its printed output captured: for refusals and plans, which do no model work and need no interpreter start-up."""
    import io

    import main as main_py

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main_py.main([str(a) for a in argv])
            except SystemExit as exit_:
                code = exit_.code
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(["main.py", *map(str, argv)], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def questions() -> list[dict]:
    return make_questions(40, seed=1)


def _build(tmp_path_factory, name: str, style: str, chat: bool, family: str, seed: int) -> Path:
    qs = make_questions(200, seed=7)
    tok = train_tokenizer(corpus(qs), vocab_size=400, style=style, chat=chat)
    # A prompt rendered once makes sure the template words are in the training text too.
    extra = [mcq_prompt(tok, question_from_dict(q), "en") for q in qs[:20]]
    tok = train_tokenizer(corpus(qs) + extra, vocab_size=400, style=style, chat=chat)
    model = build_model(tok, family=family, seed=seed, hidden=32, layers=2, heads=4)
    return save_model(model, tok, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """Tiny Llama, byte-level BPE tokenizer with a chat template."""
    return _build(tmp_path_factory, "llama", "bytelevel", True, "llama", seed=0)


@pytest.fixture(scope="session")
def qwen_plain_dir(tmp_path_factory) -> Path:
    """Tiny Qwen2, Metaspace/Unigram tokenizer, no chat template (plain "Answer:" prompts)."""
    return _build(tmp_path_factory, "qwen", "metaspace", False, "qwen2", seed=1)


@pytest.fixture
def mcq_file(tmp_path, questions) -> Path:
    path = tmp_path / "data.jsonl"
    write_jsonl(path, questions)
    return path


def run_script(script: str, *args, env: dict | None = None, timeout: float = 600, cwd: Path = ROOT):
    """Run a stage script of the repo as a user would; returns the CompletedProcess."""
    # PYTHONPATH: the scripts import `atkd` from this checkout even where it is not pip-installed.
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=cwd)


@pytest.fixture
def one_thread():
    """Torch on one thread in this process for the test (reference numbers computed here match a
    subprocess run with OMP_NUM_THREADS=1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run():
    return run_script


# ------------------------------------------------------------------ a real `transformers serve`

SERVE_STARTUP_TIMEOUT_S = 180  # loading a tiny model takes seconds; a loaded CI machine may take longer
SERVING_MODULES = ("fastapi", "uvicorn", "pydantic", "openai")


def serving_missing() -> str | None:
    """Why `transformers serve` cannot run here, or None."""
    try:
        has_cli = importlib.util.find_spec("transformers.cli.serve") is not None
    except ModuleNotFoundError:  # transformers 4.x: no transformers.cli package at all
        has_cli = False
    if not has_cli:
        return "this transformers has no `transformers serve` CLI (transformers.cli.serve)"
    missing = [m for m in SERVING_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return (f"the transformers serving extra is not installed (missing {', '.join(missing)}); "
                "pip install 'transformers[serving]'")
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.exists() else ""


def wait_until_serving(proc: subprocess.Popen, url: str, err_log: Path, name: str,
                       timeout_s: float = SERVE_STARTUP_TIMEOUT_S) -> None:
    """Poll `url` until it answers 200; fail with the server's stderr tail if it dies or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode} during startup:\n{tail(err_log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    pytest.fail(f"{name} did not answer {url} within {timeout_s}s:\n{tail(err_log)}")


@contextlib.contextmanager
def serving(cmd: list[str], env: dict, out_log: Path, err_log: Path, ready_url: str, name: str,
            timeout_s: float = SERVE_STARTUP_TIMEOUT_S):
    """A server process (`cmd`, output to the two logs) from the moment `ready_url` answers until the block ends;
    yields the process. Terminated (then killed after 20 s) whatever happens."""
    with open(out_log, "w") as out, open(err_log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
    try:
        wait_until_serving(proc, ready_url, err_log, name, timeout_s)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def transformers_serve(model_dir: Path, log_dir: Path):
    """A real `transformers serve` on loopback, on the CPU, preloading `model_dir` (requests must name
    the model exactly as that path). Yields {"base", "model", "out", "err"}; skips without the extra."""
    reason = serving_missing()
    if reason:
        pytest.skip(reason)
    port = free_port()
    out_log, err_log = log_dir / "serve.out", log_dir / "serve.err"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with serving(cmd, env, out_log, err_log, f"http://127.0.0.1:{port}/health", "transformers serve"):
        yield {"base": f"http://127.0.0.1:{port}/v1", "model": str(model_dir), "out": out_log, "err": err_log}


def served_requests(server: dict) -> int:
    """Chat requests the server answered with 200, from its own access log."""
    text = tail(server["out"], 10 ** 9) + tail(server["err"], 10 ** 9)
    return text.count('"POST /v1/chat/completions HTTP/1.1" 200')


def send_chat_reply(handler, text: str) -> None:
    """Answer an OpenAI-compatible chat request with `text` (from a test's fake endpoint's do_POST)."""
    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)
