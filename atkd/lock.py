"""One run per output folder: an exclusive lock held for the whole run (ARCHITECTURE.md §5).

A run holds `fcntl.flock` on `<folder>/.atkd.lock` (main.py on its workflow and models folders,
a stage on its output folder) and writes its holder into the file: process id, host, start time.
A second run on the same folder is refused at once with the usual one-line error and exit
status 2, naming the folder and the holder. The kernel drops a flock when its process dies,
however it dies (SIGKILL, out of memory, a closed terminal), so the lock a killed run left is
free: the next run takes it over and logs whose it was. The holder's pid and host are only for
messages; the flock alone decides.

Locks are per folder, not per tree: main.py's lock on `output/workflow` does not cover the
stage folders below it, so the stages main.py starts take their own locks without meeting it
(nothing needs passing down), and a stage started by hand on a folder that a running main.py's
stage is writing meets that stage's lock. The lock file is removed when the run ends, with the
folders the lock itself had to create if they are still empty, so a refused or bad-input run
leaves nothing behind. Hidden files are bookkeeping for the fingerprints (`atkd.fingerprint`),
so a lock file never changes a folder's content hash.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterable, Iterator

from .errors import InputError

log = logging.getLogger(__name__)

LOCK_NAME = ".atkd.lock"
# Filesystems without flock (some network mounts) answer with one of these: the run goes on unlocked.
NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def describe(holder: dict | None) -> str:
    """'process 1234 on host gpu-07, since 2025-01-31 12:00:01' (or what is known of it)."""
    if not holder:
        return "a process that left no record"
    since = f", since {holder['started']}" if holder.get("started") else ""
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}"


def _read_holder(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None


class FolderLock:
    """The lock on one folder; `acquire` raises `InputError` when another live run holds it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created: list[Path] = []  # folders made for the lock file, outermost first

    def acquire(self) -> None:
        while True:
            fd = self._open()
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise InputError(self.folder, f"in use by another run ({describe(holder)}); one run per output "
                                              "folder: wait for it to finish, or stop it") from None
            except (ImportError, OSError) as err:  # no fcntl (Windows) or a filesystem without flock
                if isinstance(err, OSError) and err.errno not in NO_LOCKING:
                    os.close(fd)
                    raise
                log.warning("cannot lock %s (%s): make sure no other run uses this folder", self.folder, err)
                os.close(fd)
                return
            if self._still_at_path(fd):
                break
            os.close(fd)  # the holder removed that file while releasing: lock the file now at the path
        previous = _read_holder(fd)
        if previous:
            log.info("taking over the lock on %s left by %s, which no longer holds it (killed?)", self.folder,
                     describe(previous))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        self._fd = fd

    def _open(self) -> int:
        missing = []
        for folder in (self.folder, *self.folder.parents):
            if folder.is_dir():
                break
            missing.append(folder)
        self._created = self._created or list(reversed(missing))
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue  # a run releasing its lock removed the (empty) folder in between

    def _still_at_path(self, fd: int) -> bool:
        try:
            here, held = os.stat(self.path), os.fstat(fd)
        except FileNotFoundError:
            return False
        return (here.st_ino, here.st_dev) == (held.st_ino, held.st_dev)

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # before closing: whoever waits re-checks that the file is still at the path
        os.close(self._fd)
        self._fd = None
        for folder in reversed(self._created):  # innermost first; stop at the first that holds something
            try:
                folder.rmdir()
            except OSError:
                break


@contextlib.contextmanager
def holding(folders: Iterable[str | Path]) -> Iterator[None]:
    """Hold the lock of every folder (each once, however it is spelled) for the duration of the block."""
    locks, seen = [], set()
    try:
        for folder in folders:
            key = Path(folder).resolve()
            if key in seen:
                continue
            seen.add(key)
            lock = FolderLock(folder)
            lock.acquire()
            locks.append(lock)
        yield
    finally:
        for lock in reversed(locks):
            lock.release()
