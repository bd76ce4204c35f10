"""The ``tiny://`` checkpoint cache shared by several processes (parallel test processes, workers on one node):
each family is built once, and a finished folder is never replaced under a process that is reading it."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from pathlib import Path

from experts.base import register_tiny, resolve_tiny

FAMILY = "zz_cache_race"


@register_tiny(FAMILY)
def _build(out: Path) -> None:
    log = Path(os.environ["MOTIONFORGE_TINY_CACHE"]) / "builds.log"
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.5)  # long enough that every contender asks while the first build is still running
    (out / "weights.json").write_text(json.dumps({"built_by": os.getpid()}))


def _contender(barrier, results: Path, idx: int) -> None:
    barrier.wait(timeout=60)
    path = resolve_tiny(f"tiny://{FAMILY}")
    time.sleep(0.2)  # still reading the folder after a later contender has returned
    (results / f"{idx}.json").write_text(json.dumps(
        {"path": str(path), "weights": json.loads((path / "weights.json").read_text())}))


def test_one_build_for_processes_that_ask_at_once(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOTIONFORGE_TINY_CACHE", str(cache))
    results = tmp_path / "results"
    results.mkdir()
    # Fresh interpreters that import this module (and so register the builder): a forked child would inherit
    # the exit hooks of Prefect services an earlier test started in this process, which fail after a fork.
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_contender, args=(barrier, results, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    builds = (cache / "builds.log").read_text().split()
    assert len(builds) == 1, f"built {len(builds)} times by {builds}"
    got = [json.loads((results / f"{i}.json").read_text()) for i in range(4)]
    assert {g["path"] for g in got} == {str(cache / FAMILY)}
    assert {g["weights"]["built_by"] for g in got} == {int(builds[0])}
    assert not list(cache.glob(f".{FAMILY}.tmp-*"))
