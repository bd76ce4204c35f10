"""One writer per output root: a lock file that names its holder and is taken over only from a dead one.

Local roots: every change to ``_lock`` (create, take over, release) happens while holding an exclusive
``flock`` on ``_lock.flock`` beside it, and the lock file itself is only ever put in place whole (written to a
temp name, then linked or renamed). So two processes can never both decide a stale lock is theirs, and no
reader ever sees a half-written lock. Remote roots have no such primitive: the lock is written whole, then read
back to check that it is ours (best effort; a lock from another host is never taken over silently).

A lock whose file is empty or not JSON (left by a process killed while writing it with an older version, or by
a remote store that lost the write) is taken over once it is older than ``grace_s``, with a log line saying so.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import posixpath
import socket
import time
import uuid
from typing import Any, Iterator

from storage.root import GarbledJSONError, OutputRoot

log = logging.getLogger("motionforge.storage.lock")

DEFAULT_GRACE_S = 10.0
_GARBLED = object()


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


@contextlib.contextmanager
def _flocked(path: str) -> Iterator[None]:
    import fcntl

    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:  # a filesystem without flock (some NFS/FUSE mounts): creation stays exclusive
            if exc.errno not in (errno.ENOLCK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            log.warning("%s: no flock on this filesystem (%s); a stale lock's takeover is not race-free here", path, exc)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


class RunLock:
    """``with RunLock(root, "run"):`` -- refuses a second concurrent run on the same root.

    A lock left by a process that died on this host (SIGKILL, OOM) is taken over; a lock from another host is
    never taken over silently. After a takeover, :attr:`taken_over` holds the dead holder's record (the flow
    layer uses its ``flow_run_id`` to mark that run crashed on the Prefect server). ``info`` adds fields to this
    holder's record (e.g. ``flow_run_id``).
    """

    def __init__(self, root: OutputRoot, what: str = "run", *, info: dict[str, Any] | None = None,
                 grace_s: float = DEFAULT_GRACE_S):
        self.root = root
        self.what = what
        self.path = root.path("_lock")
        self.info = dict(info or {})
        self.grace_s = grace_s
        self.held = False
        self.token: str | None = None
        self.taken_over: dict[str, Any] | None = None

    # -- reading ----------------------------------------------------------------------------------------------
    def _read(self) -> Any:
        """The holder's record; ``{}`` when there is no lock; ``_GARBLED`` when the file is empty or not JSON."""
        try:
            h = self.root.read_json(self.path, default={})
        except GarbledJSONError:
            return _GARBLED
        if h is None:
            return {}
        return h if isinstance(h, dict) else _GARBLED

    def _holder(self) -> dict:
        h = self._read()
        return {} if h is _GARBLED else h

    def _describe(self, h: dict) -> str:
        return (
            f"another motionforge {h.get('what', 'run')} (pid {h.get('pid')} on host {h.get('host')}, "
            f"started {h.get('started_at')}) holds the lock on {self.root.url}; wait for it to finish, or if that "
            f"process is dead on another machine, delete {self.root.uri('_lock')}"
        )

    def _age_s(self) -> float | None:
        try:
            mtime = self.root.mtime(self.path)
        except FileNotFoundError:
            return None
        return max(0.0, time.time() - mtime) if mtime is not None else None

    # -- acquiring --------------------------------------------------------------------------------------------
    def _record(self) -> dict:
        return {**self.info, "pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                "token": self.token, "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}

    def _verdict(self, h: Any, me: dict) -> tuple[str, str]:
        """("free" | "take" | "wait" | "busy", why) for the lock as read."""
        if h == {}:
            return "free", ""
        if h is _GARBLED:
            age = self._age_s()
            if age is None:
                return "free", ""
            if age >= self.grace_s:
                return "take", (f"its file {self.root.uri('_lock')} is empty or not valid JSON (a writer killed "
                                f"mid-write) and {age:.0f} s old")
            return "wait", f"lock file is empty or not valid JSON and only {age:.1f} s old (may still be being written)"
        if h.get("host") == me["host"] and isinstance(h.get("pid"), int) and not _alive(h["pid"]):
            return "take", f"its holder (pid {h['pid']}, {h.get('what', 'run')} started {h.get('started_at')}) is dead"
        return "busy", ""

    def acquire(self) -> None:
        self.token = uuid.uuid4().hex
        me = self._record()
        self.root.makedirs(self.root.base)
        deadline = time.monotonic() + self.grace_s + 5.0
        while True:
            if self.root.is_local:
                with _flocked(self.path + ".flock"):
                    state, why, h = self._try_local(me)
            else:
                state, why, h = self._try_remote(me)
            if state == "held":
                return
            if state == "wait" and time.monotonic() < deadline:
                time.sleep(min(0.5, max(0.05, self.grace_s / 20)))
                continue
            if state == "wait":
                raise RootLockedError(f"{self.root.uri('_lock')}: {why}; if no motionforge run is writing to "
                                      f"{self.root.url}, delete that file")
            raise RootLockedError(self._describe(h if isinstance(h, dict) else {}))

    def _took_over(self, h: Any, why: str) -> None:
        self.taken_over = dict(h) if isinstance(h, dict) else {"garbled": True}
        log.warning("taking over the run lock on %s: %s", self.root.url, why)

    def _try_local(self, me: dict) -> tuple[str, str, Any]:
        """Under the flock: create, take over, or refuse. The file appears whole (link/rename of a temp file)."""
        h = self._read()
        state, why = self._verdict(h, me)
        if state in ("busy", "wait"):
            return state, why, h
        d, name = posixpath.split(self.path)
        tmp = posixpath.join(d, f".tmp-{self.token}-{name}")
        with open(tmp, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            if state == "take":
                self._took_over(h, why)
                os.replace(tmp, self.path)
            else:
                try:
                    os.link(tmp, self.path)  # fails if it exists: never overwrite a lock we did not judge
                except FileExistsError:
                    return "busy", "", self._holder()
                except OSError as exc:  # no hard links here: an exclusive create, then the record
                    if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                        raise
                    try:
                        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    except FileExistsError:
                        return "busy", "", self._holder()
                    with os.fdopen(fd, "w") as f:
                        json.dump(me, f)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return self._verify(me)

    def _try_remote(self, me: dict) -> tuple[str, str, Any]:
        h = self._read()
        state, why = self._verdict(h, me)
        if state in ("busy", "wait"):
            return state, why, h
        if state == "take":
            self._took_over(h, why)
        self.root.write_json(self.path, me)
        time.sleep(0.2)  # let a racing writer's object land before checking whose lock survived
        return self._verify(me)

    def _verify(self, me: dict) -> tuple[str, str, Any]:
        h = self._read()
        if isinstance(h, dict) and h.get("token") == me["token"]:
            self.held = True
            return "held", "", h
        return "busy", "", h

    def release(self) -> None:
        if not self.held:
            return
        if self.root.is_local:
            with _flocked(self.path + ".flock"):
                if self._holder().get("token") == self.token:
                    self.root.delete(self.path)
        elif self._holder().get("token") == self.token:
            self.root.delete(self.path)
        self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
