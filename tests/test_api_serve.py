"""The HTTP backend against a real `transformers serve` process on loopback, serving a tiny local model.

`transformers serve <local folder>` preloads that folder and pins the server to it: requests must
name the model exactly as the folder path was given. It needs the serving extra
(`pip install 'transformers[serving]'`: fastapi, uvicorn, pydantic, openai); without it the test skips.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from atkd.tree import load_tree

STARTUP_TIMEOUT_S = 180  # loading a tiny model takes seconds; a loaded CI machine may take longer
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


def tail(path, chars: int = 3000) -> str:
    return path.read_text(encoding="utf-8", errors="replace")[-chars:] if path.exists() else ""


def wait_healthy(proc: subprocess.Popen, url: str, err_log) -> None:
    """Poll /health until it answers 200; fail with the server's stderr tail if it dies or times out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"transformers serve exited with {proc.returncode} during startup:\n{tail(err_log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"transformers serve did not answer {url} within {STARTUP_TIMEOUT_S}s:\n{tail(err_log)}")


@pytest.fixture
def served_model(tmp_path, llama_dir):
    reason = serving_missing()
    if reason:
        pytest.skip(reason)
    port = free_port()
    out_log, err_log = tmp_path / "serve.out", tmp_path / "serve.err"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(llama_dir),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(out_log, "w") as out, open(err_log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", err_log)
        yield {"base": f"http://127.0.0.1:{port}/v1", "model": str(llama_dir), "out": out_log, "err": err_log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_create_tree_through_transformers_serve(tmp_path, run, served_model):
    res = run("create_initial_tree.py", "--api_base", served_model["base"], "--api_model", served_model["model"],
              "--domain", "Clinical medicine", "--nodes_per_level", "2,2", "--max_new_tokens", "12",
              "--max_retries", "1", "--output_dir", tmp_path / "trees",
              "--api_key_env", "ATKD_TEST_KEY", env={"ATKD_TEST_KEY": "not-a-secret"}, timeout=300)
    assert res.returncode == 0, f"{res.stderr}\n--- server stderr ---\n{tail(served_model['err'])}"
    tree = load_tree(tmp_path / "trees" / "initial_tree.json")
    assert tree.domain == "Clinical medicine"
    # A level-1 node exists only if the server's replies held at least one usable name.
    assert 1 <= len(tree.root.children) <= 2
    assert all(len(n.children) <= 2 for n in tree.root.children)
    # The server itself logged the requests: level 1 (at least one) plus one per level-1 node.
    served = (served_model["out"].read_text(encoding="utf-8", errors="replace")
              + served_model["err"].read_text(encoding="utf-8", errors="replace"))
    answered = served.count('"POST /v1/chat/completions HTTP/1.1" 200')
    assert answered >= 1 + len(tree.root.children), served[-3000:]
