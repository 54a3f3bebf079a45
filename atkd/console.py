"""What the stages print while they work: progress bars on a terminal, plain lines everywhere else.

A progress bar redraws itself with carriage returns; in a log file (main.py tees every step's output
to `iteration_N/<step>.log`) that is one endless line of overwritten bars. So `progress_bar` draws
tqdm's bar only when stderr is a terminal; otherwise it writes the bar's text as a line of its own
at most every LINE_INTERVAL_S seconds, and once at the end (the stage's last progress line).
"""

from __future__ import annotations

import io
import os
import sys

LINE_INTERVAL_S = 30.0  # seconds between progress lines in a log (a terminal's bar redraws freely)


def on_terminal() -> bool:
    return sys.stderr.isatty()


class _Lines(io.TextIOBase):
    """A stream for tqdm that turns each redraw ("\\r<bar>") into one line of stderr (a repeat of the last
    line, as the bar's close draws it, is left out)."""

    def __init__(self):
        super().__init__()
        self.last = ""

    def write(self, text: str) -> int:
        line = text.replace("\r", "").strip()
        if line and line != self.last:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            self.last = line
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def progress_bar(iterable=None, total: int | float | None = None, desc: str = "", unit: str = "it",
                 disable: bool = False, initial: int = 0):
    """tqdm's bar on a terminal; elsewhere a line every LINE_INTERVAL_S seconds and one at the end
    (the stages import it as their `tqdm`: same arguments)."""
    from tqdm.auto import tqdm

    kwargs = dict(total=total, desc=desc, unit=unit, disable=disable, initial=initial)
    if on_terminal():
        return tqdm(iterable, **kwargs)
    return tqdm(iterable, **kwargs, file=_Lines(), mininterval=LINE_INTERVAL_S, maxinterval=LINE_INTERVAL_S,
                ascii=True, ncols=120)


def set_quiet_env() -> None:
    """Keep tokenizers' thread pool from fighting our worker processes, never touch the hub, and draw no
    hub or transformers progress bars (transformers 5 draws a "Loading weights" bar per model load; the
    variable reaches the processes this one starts, `quiet_transformers` covers this one)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
