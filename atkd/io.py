"""File io: JSONL reading with file/line errors, atomic writes, and resumable part logs.

Every output file is written to a temporary name in the same folder and renamed into place
with `os.replace` only when complete, so a file that exists is complete (ARCHITECTURE.md §5).
Long stages append finished records to a *part log* (`<output>.parts/`) as they go; a rerun
reads it back, skips that work, and the final file is assembled in input order.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import InputError

log = logging.getLogger(__name__)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; bad lines raise `InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    seen_any = False
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(path, f"not valid JSON ({err.msg} at column {err.colno})", lineno) from None
            if not isinstance(obj, dict):
                raise InputError(path, f"expected a JSON object, got {type(obj).__name__}", lineno)
            seen_any = True
            yield lineno, obj
    if not seen_any:
        raise InputError(path, "file is empty (no JSON lines)")


def read_json(path: str | Path) -> Any:
    """Load one JSON document; a missing or unparsable file raises `InputError`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise InputError(path, "file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(path, f"not valid JSON ({err.msg} at column {err.colno})", err.lineno) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write_fn, mode: str = "w") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        kwargs = {"encoding": "utf-8"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kwargs) as fh:
            write_fn(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with_suppressed_unlink(tmp)
        raise


def with_suppressed_unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def dumps_line(obj: Any) -> str:
    """One JSONL line: UTF-8 as is (Chinese stays readable), no trailing newline."""
    return json.dumps(obj, ensure_ascii=False)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Atomically write records as JSONL."""
    def write(fh):
        for rec in records:
            fh.write(dumps_line(rec) + "\n")
    _atomic_write(Path(path), write)


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write pretty-printed JSON."""
    _atomic_write(Path(path), lambda fh: fh.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n"))


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    _atomic_write(Path(path), lambda fh: fh.write(text))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write a binary file."""
    _atomic_write(Path(path), lambda fh: fh.write(data), mode="wb")


# --------------------------------------------------------------------------- part logs

def parts_dir_for(output_path: str | Path) -> Path:
    """Where a stage keeps finished-but-not-yet-assembled work for `output_path`."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + ".parts")


class PartLog:
    """Append-only logs of finished records, one file per worker, keyed by record key.

    `fingerprint` is whatever determines the records' content (the stage's arguments): parts
    written under a different fingerprint are discarded, never mixed into the output.
    A line cut short by a kill is ignored (it is the work in flight).
    """

    def __init__(self, output_path: str | Path, fingerprint: dict, key_field: str = "id"):
        self.dir = parts_dir_for(output_path)
        self.fingerprint = fingerprint
        self.key_field = key_field
        self._fp_path = self.dir / "fingerprint.json"

    def open(self) -> dict[str, dict]:
        """Create or validate the parts folder; return the records already done, by key."""
        if self.dir.exists():
            try:
                old = json.loads(self._fp_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                old = None
            if old != self.fingerprint:
                log.info("discarding partial work in %s: it was made with other arguments", self.dir)
                shutil.rmtree(self.dir)
        if not self.dir.exists():
            self.dir.mkdir(parents=True)
            write_json(self._fp_path, self.fingerprint)
        return self.done()

    def done(self) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for part in sorted(self.dir.glob("part-*.jsonl")):
            with open(part, encoding="utf-8") as fh:
                for line in fh:
                    if not line.endswith("\n"):
                        break  # cut short by a kill: work in flight
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        break
                    found[str(rec[self.key_field])] = rec
        return found

    def writer(self, rank: int = 0) -> "PartWriter":
        return PartWriter(self.dir / f"part-{rank:03d}.jsonl")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class PartWriter:
    """Appends whole batches of records, flushed and fsynced, so a kill loses only the batch in flight."""

    def __init__(self, path: Path):
        self.path = path
        self._truncate_torn_tail()

    def _truncate_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            with open(self.path, "wb") as fh:
                fh.write(keep)

    def write(self, records: Iterable[dict]) -> None:
        text = "".join(dumps_line(r) + "\n" for r in records)
        if not text:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
