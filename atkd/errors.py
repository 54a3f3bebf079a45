"""Bad-input errors: one clear line naming file, line and problem, then exit status 2.

Stages validate their inputs before writing anything, and every output is written atomically
(see `atkd.io`), so a stage that stops on an `InputError` leaves no output file behind.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path


class InputError(Exception):
    """A problem with a user-supplied file, folder or setting (never a bug in our code)."""

    def __init__(self, path: str | Path | None, problem: str, line: int | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        self.problem = problem
        super().__init__(self.message())

    def message(self) -> str:
        where = self.path or ""
        if self.path is not None and self.line is not None:
            where = f"{self.path}:{self.line}"
        return f"{where}: {self.problem}" if where else self.problem


class StageFailed(RuntimeError):
    """The work itself failed (a server refused every retry, a model wrote nothing usable): exit 1, one line."""


EXIT_BAD_INPUT = 2


@contextlib.contextmanager
def exit_on_input_error():
    """Turn an `InputError` into `error: <file>:<line>: <problem>` on stderr and exit status 2."""
    try:
        yield
    except InputError as err:
        print(f"error: {err.message()}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_BAD_INPUT) from None
