"""Path locks: an empty lock file (its owner never written, as a full disk leaves it) is taken over once
it is old, and respected while it is fresh."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pipeline.errors import BkdError


def test_an_empty_lock_left_by_a_full_disk_is_taken_over(tmp_path: Path):
    from pipeline import locks

    lock = tmp_path / "RUN.lock"
    lock.write_bytes(b"")  # created, then the disk was full before its owner was written
    old = time.time() - 2 * locks.UNREADABLE_LOCK_SECONDS
    os.utime(lock, (old, old))
    with locks.PathLock(str(lock), "busy"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_bytes(b"")  # a fresh one may be a writer between creating and filling it: respected
    with pytest.raises(BkdError, match="busy") as refused:
        with locks.PathLock(str(lock), "busy"):
            pass
    assert "None" not in str(refused.value) and "its lock names no owner" in str(refused.value)


@pytest.mark.parametrize("content", ["[]", "null", '"x"', '{"pid": "abc"}', '{"pid": 1.5}', '{"pid": null}',
                                     '{"pid": true}', "[" * 100_000])
def test_a_lock_of_any_other_shape_is_one_line_while_fresh_and_taken_over_when_old(tmp_path: Path, content):
    from pipeline import locks

    lock = tmp_path / "STORE.lock"
    lock.write_text(content)
    with pytest.raises(BkdError, match="its lock names no owner"):
        with locks.PathLock(str(lock), "busy"):
            pass
    old = time.time() - 2 * locks.UNREADABLE_LOCK_SECONDS
    os.utime(lock, (old, old))
    with locks.PathLock(str(lock), "busy"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


@pytest.mark.parametrize("pid", [10**30, -1, 0])
def test_a_lock_naming_no_live_process_here_is_taken_over(tmp_path: Path, pid):
    import socket

    from pipeline import locks

    lock = tmp_path / "STORE.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
    with locks.PathLock(str(lock), "busy"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
