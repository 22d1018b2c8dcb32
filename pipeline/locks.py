"""An exclusive lock file beside (or inside) what a command writes: a store, a run folder.

The lock is created exclusively (`xb`) through the path's fsspec filesystem (local files,
memory, object stores that support exclusive creation) and holds its owner's host and pid; a
lock left by a dead process on this host is taken over, one held by a live process is refused.
"""

from __future__ import annotations

import datetime
import json
import os
import posixpath
import socket

import fsspec

from pipeline.errors import BkdError

# An empty or unreadable lock older than this was left by a writer that died (or ran out of disk)
# between creating it and writing its owner; a live writer fills it within microseconds.
UNREADABLE_LOCK_SECONDS = 10.0


class PathLock:
    """`with PathLock(url, busy):` -- refuse a second writer while this one runs; `busy` says what is taken."""

    def __init__(self, url: str, busy: str):
        self.url, self.busy = url, busy
        self.fs, self.path = fsspec.core.url_to_fs(str(url))

    def __enter__(self):
        if posixpath.dirname(self.path):
            self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                with self.fs.open(self.path, "xb") as fh:
                    try:
                        fh.write(json.dumps(me).encode())
                    except BaseException:
                        fh.close()
                        self.fs.rm_file(self.path)  # a full disk: leave no empty lock behind
                        raise
                return self
            except FileExistsError:
                try:
                    owner = json.loads(self.fs.cat_file(self.path))
                except (OSError, ValueError, RecursionError):
                    owner = {}
                pid = owner.get("pid") if isinstance(owner, dict) else None
                if not isinstance(pid, int) or isinstance(pid, bool):
                    owner = {}  # not a lock bkd wrote whole: whose it is cannot be told
                stale = bool(owner) and owner.get("host") == me["host"] and not _pid_alive(pid)
                if stale or (not owner and self._age() > UNREADABLE_LOCK_SECONDS):
                    self.fs.rm_file(self.path)  # its process is gone, or it never got to say whose it is
                    continue
                whose = (f"pid {owner.get('pid')} on {owner.get('host')}" if owner else
                         "its lock names no owner: one is starting, or one died taking it")
                raise BkdError(f"{self.busy} ({whose}); if none is running, delete {self.url}") from None
        raise BkdError(f"cannot take the lock {self.url}")

    def _age(self) -> float:
        """Seconds since the lock file was last modified (0 if that cannot be told)."""
        try:
            modified = self.fs.modified(self.path)
        except (OSError, NotImplementedError):
            return 0.0
        return (datetime.datetime.now(modified.tzinfo) - modified).total_seconds()

    def __exit__(self, *exc):
        if self.fs.exists(self.path):
            self.fs.rm_file(self.path)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # 0 and negatives name process groups, never one writer
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True
