"""The ``tiny://`` checkpoint cache shared by several processes (parallel test processes, workers on one node):
each family is built once, and a finished folder is never replaced under a process that is reading it."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import traceback
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
    """One process asking for the family. It leaves with ``os._exit``: a forked child must not run the exit hooks
    it inherited (Prefect services that an earlier test in the parent started fail after a fork), and its outcome
    is the file it writes, with the traceback if it failed."""
    code = 1
    try:
        barrier.wait(timeout=60)
        path = resolve_tiny(f"tiny://{FAMILY}")
        time.sleep(0.2)  # still reading the folder after a later contender has returned
        (results / f"{idx}.json").write_text(json.dumps(
            {"path": str(path), "weights": json.loads((path / "weights.json").read_text())}))
        code = 0
    except BaseException:  # noqa: BLE001 -- reported through the file
        (results / f"{idx}.err").write_text(traceback.format_exc())
    finally:
        os._exit(code)


def test_one_build_for_processes_that_ask_at_once(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOTIONFORGE_TINY_CACHE", str(cache))
    results = tmp_path / "results"
    results.mkdir()
    # Forked: the builder registered above is inherited. (A spawned child would rebuild this process's sys.path,
    # where an earlier test may have put a folder whose modules shadow the standard library's.)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_contender, args=(barrier, results, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    errors = "\n".join(e.read_text() for e in sorted(results.glob("*.err")))
    assert [p.exitcode for p in procs] == [0, 0, 0, 0], errors
    builds = (cache / "builds.log").read_text().split()
    assert len(builds) == 1, f"built {len(builds)} times by {builds}"
    got = [json.loads((results / f"{i}.json").read_text()) for i in range(4)]
    assert {g["path"] for g in got} == {str(cache / FAMILY)}
    assert {g["weights"]["built_by"] for g in got} == {int(builds[0])}
    assert not list(cache.glob(f".{FAMILY}.tmp-*"))
