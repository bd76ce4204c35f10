"""One writer per output root: a lock file that names its holder and is taken over only from a dead one."""
from __future__ import annotations

import datetime as dt
import json
import os
import socket

from storage.root import OutputRoot


class RootLockedError(RuntimeError):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(root, "run"):`` -- refuses a second concurrent run on the same root.

    Locally the file is created with O_EXCL, so two processes cannot both win. A lock left by a process that
    died on this host (SIGKILL, OOM) is taken over; a lock from another host is never taken over silently.
    """

    def __init__(self, root: OutputRoot, what: str = "run"):
        self.root = root
        self.what = what
        self.path = root.path("_lock")
        self.held = False

    def _holder(self) -> dict:
        return self.root.read_json(self.path, default={}) or {}

    def _describe(self, h: dict) -> str:
        return (
            f"another motionforge {h.get('what', 'run')} (pid {h.get('pid')} on host {h.get('host')}, "
            f"started {h.get('started_at')}) holds the lock on {self.root.url}; wait for it to finish, or if that "
            f"process is dead on another machine, delete {self.root.uri('_lock')}"
        )

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
              "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        self.root.makedirs(self.root.base)
        for _ in range(2):
            if self.root.is_local:
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    pass
                else:
                    with os.fdopen(fd, "w") as f:
                        json.dump(me, f)
                    self.held = True
                    return
            elif not self.root.exists(self.path):
                self.root.write_json(self.path, me)
                self.held = True
                return
            h = self._holder()
            stale = h.get("host") == me["host"] and isinstance(h.get("pid"), int) and not _alive(h["pid"])
            if not h or stale:  # empty (crash while writing) or a dead local holder: take it over
                self.root.delete(self.path)
                continue
            raise RootLockedError(self._describe(h))
        raise RootLockedError(self._describe(self._holder()))

    def release(self) -> None:
        if self.held:
            h = self._holder()
            if h.get("pid") == os.getpid():
                self.root.delete(self.path)
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
