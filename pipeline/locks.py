"""An exclusive lock file beside (or inside) what a command writes: a store, a run folder.

The lock is created exclusively (`xb`) through the path's fsspec filesystem (local files,
memory, object stores that support exclusive creation) and holds its owner's host and pid; a
lock left by a dead process on this host is taken over, one held by a live process is refused.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket

from pipeline.errors import BkdError


class PathLock:
    """`with PathLock(url, busy):` -- refuse a second writer while this one runs; `busy` says what is taken."""

    def __init__(self, url: str, busy: str):
        from pipeline.targets.store import filesystem

        self.url, self.busy = url, busy
        self.fs, self.path = filesystem(url)

    def __enter__(self):
        if posixpath.dirname(self.path):
            self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        for _ in range(2):
            try:
                with self.fs.open(self.path, "xb") as fh:
                    fh.write(json.dumps(me).encode())
                return self
            except FileExistsError:
                try:
                    owner = json.loads(self.fs.cat_file(self.path))
                except (OSError, ValueError):
                    owner = {}
                if owner.get("host") == me["host"] and not _pid_alive(owner.get("pid", -1)):
                    self.fs.rm_file(self.path)  # stale: its process is gone
                    continue
                raise BkdError(f"{self.busy} (pid {owner.get('pid')} on {owner.get('host')}); if none is running, "
                               f"delete {self.url}") from None
        raise BkdError(f"cannot take the lock {self.url}")

    def __exit__(self, *exc):
        if self.fs.exists(self.path):
            self.fs.rm_file(self.path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0
