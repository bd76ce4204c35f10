"""N processes try to take one root's run lock at the same instant; who held it when, and who crashed.

Used by tests/test_storage.py (a few rounds) and benchmarks/bench_lock_race.py (many). Contenders are forked
(cheap), released together by a barrier, and each winner holds the lock for ``hold_s`` seconds, stamping the
times it held it. Two winners whose holding intervals overlap are a double holder.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path


def _contender(root_url: str, barrier, out_dir: str, idx: int, hold_s: float) -> None:
    from storage.lock import RootLockedError, RunLock
    from storage.root import OutputRoot

    res: dict = {"idx": idx, "pid": os.getpid()}
    try:
        root = OutputRoot(root_url)
        barrier.wait(timeout=60)
        lock = RunLock(root, f"contender {idx}", grace_s=1.0)
        try:
            lock.acquire()
        except RootLockedError:
            res["result"] = "refused"
        else:
            res["result"] = "held"
            res["t0"] = time.monotonic()
            time.sleep(hold_s)
            res["t1"] = time.monotonic()
            lock.release()
    except Exception as exc:  # noqa: BLE001 -- a crash is what the race test counts
        res["result"] = "crashed"
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["trace"] = traceback.format_exc()[-2000:]
    Path(out_dir, f"{idx}.json").write_text(json.dumps(res))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def race_round(root_dir: Path, contenders: int = 6, stale: bool = True, hold_s: float = 0.3) -> dict:
    """One round on a fresh root: returns {"held": n, "refused": n, "crashed": [...], "double": bool}."""
    import socket

    from storage.root import OutputRoot

    root_dir.mkdir(parents=True, exist_ok=True)
    root = OutputRoot(root_dir)
    if stale:  # a lock left by a process that died on this host
        root.write_json(root.path("_lock"), {"pid": dead_pid(), "host": socket.gethostname(), "what": "dead run"})
    out_dir = root_dir.parent / (root_dir.name + "-results")
    out_dir.mkdir(exist_ok=True)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(contenders)
    procs = [ctx.Process(target=_contender, args=(str(root_dir), barrier, str(out_dir), i, hold_s))
             for i in range(contenders)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    results = []
    for i in range(contenders):
        f = out_dir / f"{i}.json"
        results.append(json.loads(f.read_text()) if f.exists() else {"idx": i, "result": "crashed", "error": "no result"})
    held = sorted((r for r in results if r["result"] == "held"), key=lambda r: r["t0"])
    double = any(b["t0"] < a["t1"] for a, b in zip(held, held[1:]))
    return {"held": len(held), "refused": sum(r["result"] == "refused" for r in results),
            "crashed": [r for r in results if r["result"] == "crashed"], "double": double,
            "lock_left": root.exists(root.path("_lock"))}
