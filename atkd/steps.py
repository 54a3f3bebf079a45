"""Running one step of main.py's workflow: a stage as a subprocess, unless it is done.

A step is a stage (`atkd.stages`) and its config. Whether it is done is decided by the stage's own
done-record (`atkd.fingerprint.DoneRecord`), the same one the script reads when run by hand, so
main.py and a person at the shell always agree. A step that is not done runs as
`python -m atkd <stage> <config as flags>`, so it runs from an installed package in any folder (the
checkout's top-level script is the same command): the command is printed first (it reruns the stage by hand),
its output streams to the console and to the step's log file (as lines: a progress bar's
carriage-return redraws keep only their last state there), the stage writes its record when it
finishes, and main.py ends the step with one summary line (`[done] <step> in <s> s ...`). Stale or partial work is the stage's business: partial work made under the
same fingerprint is resumed, anything else is redone.
"""

from __future__ import annotations

import os
import shlex
import site
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cli import StageConfig, to_argv
from .fingerprint import DoneRecord
from .stages import Stage, stage_named


@dataclass
class Step:
    """One subprocess of the workflow."""

    name: str  # e.g. "A_student_reply"; also the log file's stem
    script: str  # the stage: its name ("answer") or its top-level script ("inference.py"), see atkd.stages
    cfg: StageConfig  # its settings: the flags it runs with, and what decides whether it is done
    log_path: Path | None = None
    launcher: list[str] = field(default_factory=list)  # e.g. accelerate launch ...
    env: dict[str, str] = field(default_factory=dict)
    # Flags that make the script only validate its inputs, run plainly before the launcher:
    # `accelerate launch` reports a child's exit status 2 (bad input) as 1, with a traceback.
    precheck_flags: list[str] = field(default_factory=list)

    @property
    def stage(self) -> Stage:
        return stage_named(self.script)

    @property
    def argv(self) -> list[str]:
        """What follows the interpreter: `-m atkd <stage> <flags>` (`accelerate launch` takes `-m` too)."""
        return ["-m", "atkd", self.stage.name, *to_argv(self.cfg)]

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
    started = time.monotonic()
    code = stream(step.command, step.log_path, step.env)
    if code != 0:
        raise StepFailed(step, code)
    after, why = DoneRecord(step.cfg).status()
    if after != "done":
        raise StepFailed(step, -1, f" (it exited 0 but is not done: {why})")
    print(summary_line(step, time.monotonic() - started), flush=True)
    return state


def summary_line(step: Step, seconds: float) -> str:
    """`[done] C_distill_data in 12.3 s: output/workflow/iteration_1/C_distill_data (log: ...)`."""
    out = step.cfg.outputs()[0]
    where = out.parent if out.suffix else out
    log = f" (log: {step.log_path})" if step.log_path else ""
    return f"[done] {step.name} in {seconds:.1f} s: {where}{log}"


def has_partial_work(cfg: StageConfig) -> bool:
    """Part logs or checkpoints of an unfinished run beside the stage's record (the stage decides
    whether they are resumed: only when they were made with the same fingerprint)."""
    folder = cfg.record_path().parent
    return (folder.with_name(folder.name + ".parts").is_dir() or any(folder.glob("*.parts"))
            or any(folder.glob("checkpoint-*")))


def stream(command: list[str], log_path: Path | None, env: dict[str, str]) -> int:
    """Run `command`, copying its output (stdout and stderr) to the console and to `log_path`."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **library_path(), **env)
    log_fh = None
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fh = open(log_path, "ab")
        log_fh.write(f"\n$ {shlex.join(command)}\n".encode())
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env)
    try:
        # Raw chunks to the console (a redrawn line shows as it changes); whole lines to the log.
        lines = LogLines(log_fh)
        while chunk := os.read(proc.stdout.fileno(), 65536):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            lines.write(chunk)
        lines.close()
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
        if log_fh:
            log_fh.close()


def library_path() -> dict[str, str]:
    """PYTHONPATH that makes a step import the `atkd` this process imported (a checkout run without
    installing, or a checkout beside an older installed copy); nothing when it is installed in a
    site-packages folder (putting that ahead of the standard library could shadow it)."""
    here = str(Path(__file__).resolve().parent.parent)
    installed = {str(Path(p).resolve()) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if here in installed:
        return {}
    rest = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": here + (os.pathsep + rest if rest else "")}


class LogLines:
    """Output for a log file: whole lines, each as it last looked (a "\r"-redrawn line keeps its final
    state, so a progress bar drawn by a tool we do not control is one line, not hundreds)."""

    def __init__(self, fh):
        self.fh, self.pending = fh, b""

    def write(self, chunk: bytes) -> None:
        if self.fh is None:
            return
        *done, self.pending = (self.pending + chunk).split(b"\n")
        for line in done:
            self.fh.write(last_state(line) + b"\n")
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not None and self.pending:
            self.fh.write(last_state(self.pending) + b"\n")
            self.pending = b""
            self.fh.flush()


def last_state(line: bytes) -> bytes:
    """What a terminal would show of a line redrawn with carriage returns: the text after the last one."""
    parts = [p for p in line.split(b"\r") if p.strip()]
    return parts[-1] if parts else b""
