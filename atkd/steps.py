"""Running one step of main.py's workflow: a stage script as a subprocess, unless it is done.

A step is a stage script and its config. Whether it is done is decided by the stage's own
done-record (`atkd.fingerprint.DoneRecord`), the same one the script reads when run by hand, so
main.py and a person at the shell always agree. A step that is not done runs as
`python <script> <config as flags>`: the command is printed first (it reruns the stage by hand),
its output streams to the console and to the step's log file, and the stage writes its record
when it finishes. Stale or partial work is the stage's business: partial work made under the
same fingerprint is resumed, anything else is redone.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .cli import StageConfig, to_argv
from .fingerprint import DoneRecord

ROOT = Path(__file__).resolve().parent.parent  # the stage scripts live at the repository root


@dataclass
class Step:
    """One subprocess of the workflow."""

    name: str  # e.g. "A_student_reply"; also the log file's stem
    script: str  # a stage script at the repository root, e.g. "inference.py"
    cfg: StageConfig  # its settings: the flags it runs with, and what decides whether it is done
    log_path: Path | None = None
    launcher: list[str] = field(default_factory=list)  # e.g. accelerate launch ...
    env: dict[str, str] = field(default_factory=dict)
    # Flags that make the script only validate its inputs, run plainly before the launcher:
    # `accelerate launch` reports a child's exit status 2 (bad input) as 1, with a traceback.
    precheck_flags: list[str] = field(default_factory=list)

    @property
    def argv(self) -> list[str]:
        return [str(ROOT / self.script), *to_argv(self.cfg)]

    @property
    def command(self) -> list[str]:
        return [*self.launcher, *self.argv] if self.launcher else [sys.executable, *self.argv]


class StepFailed(RuntimeError):
    def __init__(self, step: Step, code: int, why: str = ""):
        self.step, self.code = step, code
        super().__init__(f"step {step.name} failed with exit status {code}{why}; see {step.log_path}")


def run_step(step: Step, dry_run: bool = False) -> str:
    """Run `step` unless done; returns its state before running ("done", "changed" or "new").

    Raises `StepFailed` on a non-zero exit, or when the stage exits 0 without being done.
    """
    state, why = DoneRecord(step.cfg).status()
    cmd = shlex.join(step.command)
    if state == "done":
        print(f"[skip] {step.name}: {why}", flush=True)
        return state
    env = " ".join(f"{k}={v}" for k, v in step.env.items())
    if dry_run:
        print(f"[plan] {step.name}: {why}\n  {env + ' ' if env else ''}{cmd}", flush=True)
        return state
    if step.precheck_flags:
        code = stream([sys.executable, *step.argv, *step.precheck_flags], step.log_path, step.env)
        if code != 0:
            raise StepFailed(step, code)
    label = "rerun" if state == "changed" else "resume" if has_partial_work(step.cfg) else "run"
    if label == "resume":
        why = "continuing the work an earlier run left"
    print(f"[{label}] {step.name}: {why}\n  $ {env + ' ' if env else ''}{cmd}", flush=True)
    code = stream(step.command, step.log_path, step.env)
    if code != 0:
        raise StepFailed(step, code)
    after, why = DoneRecord(step.cfg).status()
    if after != "done":
        raise StepFailed(step, -1, f" (it exited 0 but is not done: {why})")
    return state


def has_partial_work(cfg: StageConfig) -> bool:
    """Part logs or checkpoints of an unfinished run beside the stage's record (the stage decides
    whether they are resumed: only when they were made with the same fingerprint)."""
    folder = cfg.record_path().parent
    return (folder.with_name(folder.name + ".parts").is_dir() or any(folder.glob("*.parts"))
            or any(folder.glob("checkpoint-*")))


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
