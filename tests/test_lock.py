"""One run per output folder (atkd/lock.py): a second run exits 2 at once naming the folder and the holder;
a run killed with SIGKILL leaves a lock the next run takes over; main.py's stages are not refused by
main.py's own lock; nothing is left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atkd.errors import InputError
from atkd.io import write_json, write_jsonl
from atkd.lock import LOCK_NAME, FolderLock, holding
from conftest import ROOT

DEMO = ROOT / "data" / "demo"
HOST = socket.gethostname()


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                PYTHONPATH=str(ROOT))


def holder_pid(folder: Path) -> int | None:
    try:
        return json.loads((folder / LOCK_NAME).read_text(encoding="utf-8"))["pid"]
    except (OSError, ValueError, KeyError):
        return None


def wait_for(condition, timeout: float = 300, proc: subprocess.Popen | None = None) -> None:
    start = time.monotonic()
    while not condition():
        assert proc is None or proc.poll() is None, "the run ended before the point the test waits for"
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.05)


# ------------------------------------------------------------------ a stage run by hand

@pytest.fixture
def analyzer_args(tmp_path) -> list[str]:
    """student_data_analyzer.py on a three-question input (no model: it runs in a second)."""
    write_json(tmp_path / "tree.json", {"Med": {"Cardio": 0, "Resp": 0}})
    write_jsonl(tmp_path / "q.jsonl", [{"id": i, "question": f"Q{i}?", "options": {"A": "a", "B": "b"},
                                        "answer_idx": "A"} for i in range(3)])
    write_jsonl(tmp_path / "paths.jsonl", [{"id": i, "ability_path": ["Cardio" if i else "Resp"]} for i in range(3)])
    write_jsonl(tmp_path / "replies.jsonl", [{"id": i, "pred_letter": "A"} for i in range(3)])
    out = tmp_path / "B"
    return [sys.executable, str(ROOT / "student_data_analyzer.py"), "--initial_tree_path", str(tmp_path / "tree.json"),
            "--paths_file", str(tmp_path / "paths.jsonl"), "--answers_file", str(tmp_path / "q.jsonl"),
            "--student_responses_file", str(tmp_path / "replies.jsonl"), "--output_tree_path", str(out / "tree.json"),
            "--output_stats_path", str(out / "stats.json")]


def test_a_stage_on_a_held_folder_exits_2_naming_the_holder_then_runs_once_it_is_free(tmp_path, analyzer_args):
    out = tmp_path / "B"
    lock = FolderLock(out)
    lock.acquire()
    try:
        res = subprocess.run(analyzer_args, capture_output=True, text=True, env=env(), timeout=120)
    finally:
        lock.release()
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"error: {out}: in use by another run (process {os.getpid()} on host {HOST}, since " in res.stderr
    assert not (out / "tree.json").exists()

    res = subprocess.run(analyzer_args, capture_output=True, text=True, env=env(), timeout=120)
    assert res.returncode == 0, res.stderr
    assert (out / "tree.json").is_file() and not (out / LOCK_NAME).exists()  # released: the file is gone


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, analyzer_args):
    out = tmp_path / "B"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from atkd.lock import FolderLock; "
                               "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
                               str(out)], stdout=subprocess.PIPE, text=True, env=env())
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=re.escape(f"process {holder.pid} on host {HOST}")):
            FolderLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert holder_pid(out) == holder.pid  # the killed run's record is still there ...
    res = subprocess.run(analyzer_args, capture_output=True, text=True, env=env(), timeout=120)
    assert res.returncode == 0, res.stderr  # ... and blocks nothing
    assert f"taking over the lock on {out} left by process {holder.pid} on host {HOST}" in res.stderr
    assert not (out / LOCK_NAME).exists()


def test_holding_locks_each_folder_once_and_removes_what_it_created(tmp_path):
    deep = tmp_path / "a" / "b"
    with holding([deep, tmp_path / "a" / ".." / "a" / "b", tmp_path / "c"]):  # one folder spelled twice
        assert holder_pid(deep) == holder_pid(tmp_path / "c") == os.getpid()
        with pytest.raises(InputError, match="in use by another run"):
            FolderLock(deep).acquire()  # a second lock of the same folder, even from this process
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # created empty for the lock: removed
    (tmp_path / "kept").mkdir()
    with holding([tmp_path / "kept"]):
        (tmp_path / "kept" / "result.txt").write_text("x")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["result.txt"]


def test_bad_input_leaves_no_output_folder_behind(tmp_path, analyzer_args):
    args = list(analyzer_args)
    args[args.index("--paths_file") + 1] = str(tmp_path / "missing.jsonl")
    res = subprocess.run(args, capture_output=True, text=True, env=env(), timeout=120)
    assert res.returncode == 2 and "missing.jsonl: file not found" in res.stderr
    assert not (tmp_path / "B").exists()


# ------------------------------------------------------------------ main.py

def main_cmd(base: Path, workflow: str = "workflow", models: str = "models") -> list[str]:
    """main.py on the demo, one iteration, the smallest sizes (no evaluation set)."""
    return [sys.executable, str(ROOT / "main.py"), "--workflow_output_dir", str(base / workflow),
            "--models_output_dir", str(base / models), "--num_iterations", "1",
            "--dataset_files_per_iteration", str(DEMO / "iteration_1.jsonl"),
            "--ability_class_files_per_iteration", str(DEMO / "iteration_1_ability_paths.jsonl"),
            "--eval_dataset_path", "", "--eval_ability_class_path", "", "--num_distill_samples", "12",
            "--train_epochs", "1", "--gpus_to_use", ""]


def test_main_on_a_held_folder_exits_2_at_once_naming_the_holder(tmp_path):
    """main.py holds both output folders for the whole run: a second run is refused before any work, whichever
    of the two it shares. (That main.py's own stages are not refused by its lock, and that a dead run's lock is
    taken over, every end-to-end run and the stage tests above show.)"""
    with holding([tmp_path / "workflow", tmp_path / "models"]):
        second = subprocess.run(main_cmd(tmp_path), capture_output=True, text=True, env=env(), cwd=ROOT, timeout=120)
        # Another workflow folder, the same models folder: refused for the models folder.
        third = subprocess.run(main_cmd(tmp_path, workflow="other"), capture_output=True, text=True, env=env(),
                               cwd=ROOT, timeout=120)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert second.stderr.strip().splitlines() == [
        line for line in second.stderr.strip().splitlines() if line.startswith("error: ")]  # one line, nothing else
    assert f"error: {tmp_path / 'workflow'}: in use by another run (process {os.getpid()} on host {HOST}" \
        in second.stderr
    assert third.returncode == 2 and f"error: {tmp_path / 'models'}: in use by another run (process {os.getpid()}" \
        in third.stderr
    assert not (tmp_path / "other").exists()  # the refused run left nothing
    assert not (tmp_path / "workflow" / "iteration_1").exists()


def test_dry_run_takes_no_lock(tmp_path):
    with holding([tmp_path / "workflow"]):
        res = subprocess.run(main_cmd(tmp_path) + ["--dry_run"], capture_output=True, text=True, env=env(),
                             cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "[plan] A_student_reply" in res.stdout
