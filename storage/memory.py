"""Gives the memory that the C allocator holds free back to the operating system, in long-lived processes.

A process that goes over thousands of shards (the flow process of `motionforge run`, a Ray worker, the report,
`export hf`) allocates and frees the same few MiB per shard. glibc keeps the freed pages of its heaps mapped and
resident, and over a run those free chunks grow with the number of shards while the memory in use does not:
over 2,000 ingest shards in one process, in-use memory stayed at 37 MiB, the heap's free chunks grew from 5 to
48 MiB, and the resident set grew by 22.6 KiB per shard (docs/cluster.md, "The flow process"). ``malloc_trim(0)``
hands those pages back (madvise), about 0.7 ms here; throttled to once a second per process, the same loop grew by
1.6 KiB per shard.

A no-op where the C library has no ``malloc_trim`` (macOS, musl) and with ``MOTIONFORGE_MALLOC_TRIM=0``.
"""
from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Callable

ENV_SWITCH = "MOTIONFORGE_MALLOC_TRIM"


def _find_malloc_trim() -> Callable[[int], int] | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the process's own symbols: glibc's when it is the C library
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class FreedMemory:
    """``release()`` trims at most once per ``every_s`` seconds; a caller that finds another thread trimming, or
    a trim less than ``every_s`` ago, goes on at once. ``trim`` is injectable for tests."""

    def __init__(self, every_s: float = 1.0, trim: Callable[[int], int] | None | str = "auto",
                 clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self._trim = _find_malloc_trim() if trim == "auto" else trim
        self._clock = clock
        self._last: float | None = None
        self._lock = threading.Lock()
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def release(self) -> bool:
        """True when this call trimmed."""
        if self._trim is None:
            return False
        now = self._clock()
        if (self._last is not None and now - self._last < self.every_s) or not self._lock.acquire(blocking=False):
            return False
        try:
            self._last = now
            self._trim(0)
            self.trims += 1
            return True
        finally:
            self._lock.release()


_PROCESS = FreedMemory()
if hasattr(os, "register_at_fork"):  # a child forked while another thread trimmed must not inherit a held lock
    os.register_at_fork(after_in_child=lambda: setattr(_PROCESS, "_lock", threading.Lock()))


def release_freed_memory() -> bool:
    """Called after each shard a long-lived process finishes (writing or reading it): at most one trim a second."""
    return _PROCESS.release()
