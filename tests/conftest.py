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


def pytest_configure(config):
    """Bytecode for the package and the scripts' helpers, written once before the workers start. Where
    PYTHONDONTWRITEBYTECODE is set (CI images often set it) nothing writes it, and every stage subprocess the
    tests start (hundreds) would compile atkd from source again: about 0.4 s of CPU each on 2 cores."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        import compileall

        for folder in (ROOT / "atkd", ROOT / "data"):
            compileall.compile_dir(folder, quiet=1)


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


def in_process(main, argv: list, argv0: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`main(argv)` of a top-level script run in this process as the shell would run it: `env` added to the
    environment, `cwd` the working folder, `sys.argv[0]` the script (argparse's usage line names it), stdout and
    stderr captured, logging set up by the script itself, and every one of these put back afterwards. An uncaught
    exception is a traceback on stderr and exit status 1, as in a subprocess. What it skips is the interpreter's
    start-up: about 3 s of importing torch and transformers per call on 2 cores."""
    import io
    import logging
    import traceback

    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in argv]
    saved_env, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = []  # the script's logging.basicConfig adds its own handler, to the captured stderr
    os.environ.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    sys.argv = [argv0, *argv]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:
                code = exit_.code
                if isinstance(code, str):
                    print(code, file=sys.stderr)
                    code = 1
            except Exception:  # noqa: BLE001 (what the interpreter does with it)
                traceback.print_exc()
                code = 1
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers, sys.argv = saved_handlers, saved_argv
        root.setLevel(saved_level)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess([argv0, *argv], code or 0, out.getvalue(), err.getvalue())


def main_in_process(argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """main.py's `main(argv)` in this process, from the repository root (its default paths are relative to it):
    for refusals and plans, which do no model work and need no interpreter start-up."""
    import main as main_py

    return in_process(main_py.main, argv, str(ROOT / "main.py"), env)


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


# Scripts `run_script` always starts in a process of their own: training builds accelerate's process-wide state
# (one per process, its settings fixed at the first run), and main.py's runs are the end-to-end tests.
OWN_PROCESS = {"train.py", "main.py"}


def run_script(script: str, *args, env: dict | None = None, timeout: float = 600, cwd: Path = ROOT,
               own_process: bool = False) -> subprocess.CompletedProcess:
    """Run a top-level script of the repo with `args`, as a user would; returns the CompletedProcess.

    A stage script runs in this process (`in_process`: the same `main(argv)` the shell runs, without the
    interpreter's start-up) unless `own_process` or the script is in OWN_PROCESS; tests that kill a run or
    need a fresh interpreter start their own process."""
    if own_process or script in OWN_PROCESS:
        # PYTHONPATH: the scripts import `atkd` from this checkout even where it is not pip-installed.
        full_env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        full_env.update(env or {})
        return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                              text=True, env=full_env, timeout=timeout, cwd=cwd)
    return in_process(script_module(script).main, list(args), str(ROOT / script), env, cwd)


def script_module(script: str):
    """The top-level script `script` (e.g. "inference.py") imported as a module (not run: no __main__)."""
    import importlib

    return importlib.import_module(Path(script).stem)


def killed_when(cmd: list[str], ready, env: dict, timeout: float = 600, stdout: Path | None = None,
                cwd: Path = ROOT) -> None:
    """Start `cmd` in its own process group and SIGKILL the whole group (the command and every stage it
    started) once `ready()` is true; its output to `stdout` when given. Fails if it ends first or never gets there."""
    import signal

    out = open(stdout, "w") if stdout else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
    start = time.time()
    try:
        while not ready():
            assert proc.poll() is None, f"{' '.join(map(str, cmd[:4]))} ... finished before the kill point"
            assert time.time() - start < timeout, "kill point never reached"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if stdout:
            out.close()


def parts_written(parts_dir: Path) -> bool:
    """Whether a stage's part-log folder holds a part with at least one answer in it."""
    return parts_dir.is_dir() and any(p.stat().st_size > 0 for p in parts_dir.glob("part-*.jsonl"))


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
