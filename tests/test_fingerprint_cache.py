"""The hash cache never returns the hash of old contents, even where a rewrite keeps size, mtime and ctime:
file systems with coarse timestamps (1 s ticks, 2 s on FAT) or cached attributes (NFS) can show a
same-size rewrite within one tick with every cached field unchanged. A hash taken within 2 s of the
file's mtime or ctime is not cached, so such a file is hashed again."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from atkd import fingerprint
from atkd.fingerprint import file_sha256


class CoarseStat:
    """A stat result as a file system with coarse timestamps shows it: the ctime never moves past the mtime's
    tick (here: equal to the mtime), so setting the mtime back also hides the rewrite from the ctime."""

    def __init__(self, st: os.stat_result):
        self._st = st

    def __getattr__(self, name):
        return getattr(self._st, name)

    @property
    def st_ctime_ns(self) -> int:
        return self._st.st_mtime_ns

    @property
    def st_ctime(self) -> float:
        return self._st.st_mtime


@pytest.fixture
def coarse(monkeypatch, tmp_path):
    monkeypatch.setenv("ATKD_CACHE_DIR", str(tmp_path / "cache"))
    real = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, **kw: CoarseStat(real(self, **kw)))
    return tmp_path


def rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    st = os.stat(path)
    with open(path, "r+b") as fh:  # in place: the inode stays
        fh.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_same_size_rewrite_within_the_tick_is_hashed_again(coarse):
    f = coarse / "weights.bin"
    f.write_bytes(b"old contents")
    assert file_sha256(f) == hashlib.sha256(b"old contents").hexdigest()
    rewrite_keeping_size_and_mtime(f, b"new contents")
    assert os.stat(f).st_size == len(b"old contents")
    assert file_sha256(f) == hashlib.sha256(b"new contents").hexdigest()
    assert not list((coarse / "cache").glob("*"))  # a file younger than 2 s is not cached


def test_a_settled_file_is_cached_and_a_later_rewrite_changes_its_key(coarse):
    f = coarse / "weights.bin"
    f.write_bytes(b"old contents")
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(f, ns=(an_hour_ago, an_hour_ago))
    assert file_sha256(f) == hashlib.sha256(b"old contents").hexdigest()
    assert len(list((coarse / "cache").glob("*"))) == 1  # read once, then from the cache
    with open(f, "r+b") as fh:  # a rewrite now, with the real clock: a later tick than the cached mtime
        fh.write(b"new contents")
    assert file_sha256(f) == hashlib.sha256(b"new contents").hexdigest()


def test_the_window_is_two_seconds_on_either_time():
    now = time.time_ns()

    class St:
        def __init__(self, mtime_s_ago: float, ctime_s_ago: float):
            self.st_mtime_ns, self.st_ctime_ns = now - int(mtime_s_ago * 1e9), now - int(ctime_s_ago * 1e9)

    assert fingerprint.settled(St(3, 3), now)
    assert not fingerprint.settled(St(1.9, 3), now) and not fingerprint.settled(St(3, 1.9), now)
    assert not fingerprint.settled(St(-5, -5), now)  # a time in the future (clock skew): not settled
