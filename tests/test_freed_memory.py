"""Long-lived processes hand freed heap pages back: ``storage.memory`` trims at most once a second, never makes a
caller wait for another thread's trim, and is called after each shard written (``run_shard``) and each shard read
(``OutputRoot.iter_stage``)."""
from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import stages.runner as runner
import storage.root as root_mod
from storage.memory import FreedMemory
from storage.root import OutputRoot
from tests import _slow_stage as slow

REPO = Path(__file__).resolve().parents[1]


def test_trims_at_most_once_per_interval():
    calls, now = [], [100.0]
    fm = FreedMemory(every_s=1.0, trim=lambda pad: calls.append(pad) or 1, clock=lambda: now[0])
    assert fm.release() is True  # the first call trims
    for t in (100.2, 100.9, 100.999):
        now[0] = t
        assert fm.release() is False
    now[0] = 101.0
    assert fm.release() is True
    now[0] = 101.5
    assert fm.release() is False
    assert calls == [0, 0] and fm.trims == 2  # pad 0: give back everything above the heap's live chunks


def test_a_caller_never_waits_for_another_threads_trim():
    entered, leave = threading.Event(), threading.Event()

    def slow_trim(pad: int) -> int:
        entered.set()
        leave.wait(10)
        return 1

    fm = FreedMemory(every_s=0.0, trim=slow_trim)
    t = threading.Thread(target=fm.release)
    t.start()
    try:
        assert entered.wait(10)
        assert fm.release() is False  # returns at once: the lock is taken without blocking
    finally:
        leave.set()
        t.join(10)
    assert fm.trims == 1


def test_switched_off_by_environment_or_missing_libc_function(monkeypatch):
    monkeypatch.setenv("MOTIONFORGE_MALLOC_TRIM", "0")
    fm = FreedMemory()
    assert not fm.available and fm.release() is False
    assert FreedMemory(trim=None).release() is False


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
def test_real_trim_returns_the_free_pages_of_a_fragmented_heap():
    """In a fresh process: 96 MiB of 1 KiB blocks from the main heap, every 64th kept (so the heap's top cannot
    shrink and glibc keeps the 94.5 MiB of free chunks resident), then one release. The resident set must drop
    by most of the freed memory; it does not depend on timing or load, only on glibc's heap layout."""
    code = textwrap.dedent("""
        import ctypes, json
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        def rss_kib():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        blocks = [libc.malloc(1024) for _ in range(96 * 1024)]
        for b in blocks:
            ctypes.memset(b, 1, 1024)  # touch: resident
        for i, b in enumerate(blocks):
            if i % 64:
                libc.free(b)
        before = rss_kib()
        from storage.memory import FreedMemory
        trimmed = FreedMemory().release()
        print(json.dumps({"before": before, "after": rss_kib(), "trimmed": trimmed}))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    import json

    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["trimmed"] is True
    # 94.5 MiB were freed; leave room for pages that hold a kept block (one 1 KiB block per 64 KiB: <= 2 pages of
    # 16) and the allocator's own bookkeeping. Half of it is far above what a process without the trim gives back.
    assert got["before"] - got["after"] > 48 * 1024, got


def test_called_after_each_shard_written_and_read(tmp_path, monkeypatch):
    written, read = [], []
    monkeypatch.setattr(runner, "release_freed_memory", lambda: written.append(1) or False)
    root = OutputRoot(tmp_path / "r")
    slow.plan(root, 12, 4)
    for k in range(3):
        assert runner.run_shard(slow.STAGE, root, slow.SlowConfig(), k).action == "written"
    assert len(written) == 3
    assert runner.run_shard(slow.STAGE, root, slow.SlowConfig(), 0).action == "skipped-complete"
    assert len(written) == 3  # a skipped shard allocated nothing worth trimming
    monkeypatch.setattr(root_mod, "release_freed_memory", lambda: read.append(1) or False)
    for ahead in (1, 8):
        read.clear()
        assert [s for s, _ in root.iter_stage("slow", ahead=ahead)] == [0, 1, 2]
        assert len(read) == 3
