"""A stage's life, written once: every stage's `run(cfg)` is `run_stage(cfg, check, work)`.

    1. done-check: the done-record matches the settings and the outputs exist -> nothing to do (None);
    2. `check()`: read and check every input; an `InputError` here leaves nothing written;
    3. the old done-record is removed (until this run finishes, the stage is not done);
    4. `work(job, parts)`: the stage's own work; what must survive a kill goes to a part log opened
       with `parts.log(...)` (a rerun with the same settings finds it there and skips it);
    5. the outputs `work` returns are written, each atomically, in order;
    6. the done-record is written, last: a kill before it means the stage is not done;
    7. the part logs are removed (their work is in the outputs now).

An exception from `work` leaves the part logs in place, so the same command continues the work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from .fingerprint import DoneRecord
from .io import PartLog, write_bytes, write_json, write_jsonl, write_text

log = logging.getLogger(__name__)

Job = TypeVar("Job")


@dataclass
class Outputs:
    """What a stage's work produced: the files to write, and the summary `run` returns."""

    summary: Any
    # written in this order: a list is JSON Lines, a dict JSON, bytes and str as they are
    files: dict[Path, Any] = field(default_factory=dict)
    # False on the processes of a multi-process run that are not the main one (one record, from rank 0)
    write_record: bool = True


class Parts:
    """The part logs one run opens; removed together once the done-record is written."""

    def __init__(self, fingerprint: dict):
        self.fingerprint = fingerprint  # the done-record's: what the work depends on
        self.logs: list[PartLog] = []

    def log(self, output_path: str | Path, extra: dict | None = None, fingerprint: dict | None = None,
            key_field: str = "id") -> PartLog:
        """A part log beside `output_path`, valid for the stage's fingerprint plus `extra` (numbers the work
        depends on that are not settings: the device type, the dtype), or for `fingerprint` instead (work
        that depends on part of the settings only: one agent's answers)."""
        part_log = PartLog(output_path, {**(fingerprint if fingerprint is not None else self.fingerprint),
                                         **(extra or {})}, key_field=key_field)
        self.logs.append(part_log)
        return part_log

    def remove(self) -> None:
        for part_log in self.logs:
            part_log.remove()


def run_stage(cfg, check: Callable[[], Job], work: Callable[[Job, Parts], Outputs],
              check_only: bool = False) -> Any:
    """Run one stage (the steps in the module docstring); its summary, or None when it was done before
    (or `check_only`: the inputs are checked and nothing is done)."""
    record = DoneRecord(cfg)
    if not check_only and record.is_done():
        return None
    job = check()
    if check_only:
        return None
    record.start()
    parts = Parts(record.fingerprint)
    out = work(job, parts)
    for path, content in out.files.items():
        write_output(path, content)
    if out.write_record:
        record.write()
    parts.remove()
    if out.files:
        log.info("wrote %s", ", ".join(str(p) for p in out.files))
    return out.summary


def write_output(path: str | Path, content: Any) -> None:
    """One output file, atomically, in the form its content says."""
    if isinstance(content, list):
        write_jsonl(path, content)
    elif isinstance(content, dict):
        write_json(path, content)
    elif isinstance(content, bytes):
        write_bytes(path, content)
    elif isinstance(content, str):
        write_text(path, content)
    else:
        raise TypeError(f"{path}: cannot write a {type(content).__name__}")
