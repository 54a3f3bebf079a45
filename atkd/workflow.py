"""Running the pipeline's steps as subprocesses, skipping the ones already done (DESIGN §3, §6).

A step is done when its outputs exist and its done-marker (`.done.<step>.json` in its folder)
records the same arguments and the same input fingerprints as now. Otherwise it runs again:
when it was started before with other arguments or inputs, its folder is cleared first (stale
partial work and checkpoints must not be resumed); when it was started with the same ones, its
own resume picks up the work already written. Each run prints the command, streams the output to
the console and to the step's log file, and the marker is written only after a clean exit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .io import write_json

log = logging.getLogger(__name__)

HASH_LIMIT = 64 * 2**20  # files up to 64 MiB are fingerprinted by content, larger ones by size+mtime
VOLATILE_FLAGS = {"--gpu_ids"}  # where a step runs does not change what it computes


@dataclass
class Step:
    """One subprocess of the workflow."""

    name: str  # e.g. "A_student_reply"; also the log file's stem
    argv: list[str]  # script and flags: what the marker compares and what a person reruns by hand
    folder: Path  # owned by this step: holds its outputs and marker; cleared when its inputs change
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)
    log_path: Path | None = None
    launcher: list[str] = field(default_factory=list)  # e.g. accelerate launch ...; not fingerprinted
    env: dict[str, str] = field(default_factory=dict)
    # Flags that make the script only validate its inputs, run plainly before the launcher:
    # `accelerate launch` reports a child's exit status 2 (bad input) as 1, with a traceback.
    precheck_flags: list[str] = field(default_factory=list)

    @property
    def marker(self) -> Path:
        return self.folder / f".done.{self.name}.json"

    @property
    def started(self) -> Path:
        return self.folder / f".started.{self.name}.json"

    @property
    def command(self) -> list[str]:
        return [*self.launcher, *self.argv] if self.launcher else [sys.executable, *self.argv]


class StepFailed(RuntimeError):
    def __init__(self, step: Step, code: int):
        self.step, self.code = step, code
        super().__init__(f"step {step.name} failed with exit status {code}; see {step.log_path}")


def fingerprint(path: Path) -> str:
    """Content hash of a file (or every file under a folder); size+mtime for very large files."""
    h = hashlib.sha256()
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not _scratch(p, path))
    for f in files:
        st = f.stat()
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        if st.st_size <= HASH_LIMIT:
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _scratch(p: Path, root: Path) -> bool:
    """Files that say nothing about content: markers, args records, logs, in-flight parts."""
    rel = p.relative_to(root).parts
    return any(part.startswith(".") or part.endswith(".parts") for part in rel) or p.name.endswith((".args.json", ".log"))


def semantic_args(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in VOLATILE_FLAGS:
            skip = True
            continue
        out.append(a)
    return out


def step_record(step: Step) -> dict:
    return {"argv": semantic_args(step.argv), "inputs": {str(p): fingerprint(p) for p in step.inputs}}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def why_rerun(old: dict, new: dict) -> str:
    """A short human reason: which flag or input changed."""
    if old["argv"] != new["argv"]:
        a, b = _flags(old["argv"]), _flags(new["argv"])
        changed = [f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return "arguments changed: " + ", ".join(changed or ["script"])
    changed = [p for p in new["inputs"] if old["inputs"].get(p) != new["inputs"][p]]
    return "inputs changed: " + ", ".join(changed)


def _flags(argv: list[str]) -> dict:
    out, key = {"script": argv[0] if argv else None}, None
    for a in argv[1:]:
        if a.startswith("--"):
            key = a
            out[key] = True
        elif key:
            out[key] = a
            key = None
    return out


def status(step: Step) -> tuple[str, str]:
    """("done" | "resume" | "rerun" | "new", reason)."""
    record = step_record(step)
    done = _read(step.marker)
    if done is not None and all(p.exists() for p in step.outputs):
        if {k: done.get(k) for k in record} == record:
            return "done", "outputs and marker match"
        return "rerun", why_rerun(done, record)
    started = _read(step.started)
    if started is not None:
        if {k: started.get(k) for k in record} == record:
            return "resume", "continuing interrupted work"
        return "rerun", why_rerun(started, record)
    return "new", ""


def clear_folder(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)


def run_step(step: Step, dry_run: bool = False) -> str:
    """Run `step` unless done; returns its status. Raises `StepFailed` on a non-zero exit."""
    state, reason = status(step)
    cmd = shlex.join(step.command)
    if state == "done":
        print(f"[skip] {step.name}: done ({reason})", flush=True)
        return state
    if dry_run:
        env = " ".join(f"{k}={v}" for k, v in step.env.items())
        print(f"[plan] {step.name}: {state}{' - ' + reason if reason else ''}\n  {env + ' ' if env else ''}{cmd}", flush=True)
        return state
    if state == "rerun":
        print(f"[rerun] {step.name}: {reason}", flush=True)
        clear_folder(step.folder)
    elif state == "resume":
        print(f"[resume] {step.name}: {reason}", flush=True)
    step.marker.unlink(missing_ok=True)
    step.folder.mkdir(parents=True, exist_ok=True)
    record = step_record(step)
    write_json(step.started, record)
    if step.precheck_flags:
        code = stream([sys.executable, *step.argv, *step.precheck_flags], step.log_path, step.env)
        if code != 0:
            raise StepFailed(step, code)
    print(f"[run] {step.name}\n  $ {cmd}", flush=True)
    code = stream(step.command, step.log_path, step.env)
    if code != 0:
        raise StepFailed(step, code)
    missing = [str(p) for p in step.outputs if not p.exists()]
    if missing:
        raise StepFailed(step, -1) from RuntimeError(f"exited 0 but did not write {missing}")
    write_json(step.marker, {**record, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    return state


def stream(command: list[str], log_path: Path | None, env: dict[str, str]) -> int:
    """Run `command`, copying its output (stdout and stderr) to the console and to `log_path`."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **env)
    log_fh = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fh = open(log_path, "ab")
        log_fh.write(f"\n$ {shlex.join(command)}\n".encode())
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env)
    try:
        # Raw chunks, not lines: tqdm redraws with \r and would otherwise show up only at the end.
        while chunk := os.read(proc.stdout.fileno(), 65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            if log_fh:
                log_fh.write(chunk)
                log_fh.flush()
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        if log_fh:
            log_fh.close()
