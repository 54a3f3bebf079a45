"""The one owner of staleness: a stage's fingerprint and its done-record.

A stage's fingerprint holds everything that can change what it writes:
- every setting of its config except those declared `affects_output=False` and output paths;
- for each model folder and input file or folder, a hash of its *contents* (never its path or
  mtime: retrained weights written to the same path, even with the old size and mtime, change it);
- the stage's code version (`StageConfig.version`) and the version of the prompts it renders (the
  stage table's `prompts`, `atkd.stages`: none for B, H and D2; every prompt for a config outside
  the table), so editing one prompt reruns only the stages that render it, and those after them.

When a stage finishes it writes its done-record beside its outputs, named after its stage
(`atkd.paths.done_record`: `answer.done.json`, `replay.done.json`, `train.done.json`): the
fingerprint, the outputs it wrote (relative to the record's folder), the command line it ran with
and the library versions. The stage is done when its outputs exist and the record is theirs (one
stage run twice by hand into one folder, with two output names, keeps one record: the other
output is not done) with the current fingerprint. main.py's skip decision and a
stage run by hand read that same record, so a finished step is skipped either way, and a changed
setting or input reruns it either way. Partial work inside a stage (part logs, checkpoints) is
keyed by the same fingerprint, so it is resumed only by a run that would produce the same result.

Hashing is SHA-256 over the bytes. A file's hash is cached (`$ATKD_CACHE_DIR`, default
`~/.cache/atkd/hashes`) under its path, size, mtime, ctime and inode, so a 15 GB checkpoint is
read once, not at every step. A rewrite changes the ctime (it cannot be set back), but only by
the timestamp's tick: 1 s on older file systems, 2 s on FAT, and NFS clients cache attributes, so
a same-size rewrite within one tick of the hash can keep every one of those fields. A hash is
therefore cached only when the file's mtime and ctime both lie more than `SETTLED_S` (2 s) before
the moment hashing began; a file younger than that is hashed again at each call until it settles,
and any later rewrite falls in a later tick and changes the key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import fields
from pathlib import Path

from .cli import INPUT, MODEL, OUTPUT, StageConfig, to_argv
from .io import write_json
from .paths import DONE_MARKER

log = logging.getLogger(__name__)

MISSING_PATH = "missing"  # the signature of a path that does not exist (yet)
SETTLED_S = 2.0  # seconds between a file's last mtime/ctime and its hashing before the hash is cached
CACHE_KEY_VERSION = 2  # 2: entries are written only for settled files (older entries are not trusted)


# --------------------------------------------------------------------------- content signatures

def _cache_dir() -> Path | None:
    root = os.environ.get("ATKD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "atkd", "hashes")
    return Path(root)


def _cache_key(path: Path, st: os.stat_result) -> str:
    key = (f"v{CACHE_KEY_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
           f"|{st.st_dev}")
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def settled(st: os.stat_result, hashed_at_ns: int) -> bool:
    """True when the file's mtime and ctime both lie more than SETTLED_S before `hashed_at_ns`: a rewrite after
    that moment lands in a later timestamp tick. Times in the future (clock skew) are not settled."""
    return hashed_at_ns - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLED_S * 1e9


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, cached under its stat identity (see the module docstring)."""
    path = Path(path)
    st = path.stat()
    cache = _cache_dir()
    entry = cache / _cache_key(path, st) if cache is not None else None
    if entry is not None and entry.is_file():
        cached = entry.read_text(encoding="ascii").strip()
        if len(cached) == 64:
            return cached
    hashed_at = time.time_ns()
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    # Cached only when settled, and unchanged while we read it.
    if entry is not None and settled(st, hashed_at) and path.stat().st_ctime_ns == st.st_ctime_ns:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
            tmp.write_text(digest, encoding="ascii")
            os.replace(tmp, entry)
        except OSError:
            pass  # a read-only home only costs the re-hash
    return digest


def is_bookkeeping(rel_parts: tuple[str, ...]) -> bool:
    """Files that say nothing about a folder's content: hidden files, records, logs, partial work, and a
    model card (README.md at the top: main.py rewrites it after the evaluation, `atkd.model_card`)."""
    name = rel_parts[-1]
    return (any(p.startswith(".") or p.endswith(".parts") for p in rel_parts)
            or name.endswith((DONE_MARKER, ".log")) or rel_parts == ("README.md",))


def signature(path: str | Path) -> str:
    """Content hash of a file, or of every (non-bookkeeping) file under a folder, with their names."""
    path = Path(path)
    if not path.exists():
        return MISSING_PATH
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).parts
        if not is_bookkeeping(rel):
            h.update(f"{'/'.join(rel)}\0{file_sha256(f)}\n".encode("utf-8"))
    return h.hexdigest()


# --------------------------------------------------------------------------- fingerprints

def fingerprint(cfg: StageConfig, exclude: tuple[str, ...] = ()) -> dict:
    """What decides the stage's output: settings, input contents, code and prompt versions.

    `exclude` leaves out settings that do not concern a part of the work (one agent's answers do
    not depend on the other agent's model).
    """
    from .prompts import prompts_version

    out: dict = {"stage": type(cfg).__name__, "version": cfg.version}
    rendered = rendered_prompts(cfg)
    if rendered:  # a stage that renders no prompt (B, H, D2) does not depend on any
        out["prompts"] = prompts_version(rendered)
    exclude = (*exclude, *cfg.unused_settings())
    for f in fields(cfg):
        meta = f.metadata
        if f.name in exclude or not meta.get("affects_output", True) or meta.get("role") == OUTPUT:
            continue
        value = getattr(cfg, f.name)
        out[f.name] = signature(value) if meta.get("role") in (MODEL, INPUT) and value else value
    return out


def rendered_prompts(cfg: StageConfig) -> tuple[str, ...]:
    """The prompts `cfg`'s stage renders (`atkd.stages`); every prompt for a config outside the table."""
    from .prompts import PROMPT_NAMES
    from .stages import prompts_of

    named = prompts_of(type(cfg).__name__)
    return PROMPT_NAMES if named is None else named


def changed_keys(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _is_signature(value) -> bool:
    return value == MISSING_PATH or (isinstance(value, str) and len(value) == 64
                                     and all(c in "0123456789abcdef" for c in value))


def describe_changes(old: dict, new: dict) -> str:
    """'num_samples 60 -> 72, input_file (contents)': what differs between two fingerprints."""
    parts = []
    for k in changed_keys(old, new):
        a, b = old.get(k), new.get(k)
        parts.append(f"{k} (contents)" if _is_signature(a) or _is_signature(b) else f"{k} {a!r} -> {b!r}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- done-records

class DoneRecord:
    """A stage's done-record: written last, read by the stage itself and by main.py."""

    def __init__(self, cfg: StageConfig, fp: dict | None = None):
        self.cfg = cfg
        self.path = cfg.record_path()
        self.fingerprint = fp if fp is not None else fingerprint(cfg)

    def read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def status(self) -> tuple[str, str]:
        """("done" | "changed" | "new", why): done when the outputs exist and the record matches."""
        old = self.read()
        if old is None:
            return "new", "not finished before"
        if old.get("outputs") != self.outputs():
            return "new", f"the record {self.path} is of other outputs ({', '.join(old.get('outputs') or [])})"
        changed = describe_changes(old.get("fingerprint", {}), self.fingerprint)
        if changed:
            return "changed", "changed since the last run: " + changed
        missing = [str(p) for p in self.cfg.outputs() if not p.exists()]
        if missing:
            return "new", "outputs missing: " + ", ".join(missing)
        return "done", "outputs are up to date"

    def is_done(self) -> bool:
        state, why = self.status()
        if state == "done":
            log.info("nothing to do: %s (%s)", why, self.path)
        elif state == "changed":
            log.info("%s: redoing", why)
        return state == "done"

    def outputs(self) -> list[str]:
        """The stage's outputs, relative to the record's folder (moving the folder keeps the work done)."""
        return [os.path.relpath(p, self.path.parent) for p in self.cfg.outputs()]

    def start(self) -> None:
        """Forget the old record: until this run finishes, the stage is not done."""
        self.path.unlink(missing_ok=True)

    def write(self, **extra) -> None:
        write_json(self.path, {
            "fingerprint": self.fingerprint,
            "outputs": self.outputs(),
            "argv": [sys.argv[0], *to_argv(self.cfg)],
            "versions": versions(),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            **extra,
        })


def versions() -> dict:
    """The versions a result was computed with (recorded, not fingerprinted: an upgrade keeps finished work).
    Read from the installed packages' metadata: a stage that needs no model (B, D2) does not import torch for it."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": installed("torch"), "transformers": installed("transformers")}
