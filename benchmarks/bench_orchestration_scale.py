"""Orchestration at scale: one flow run of thousands of (stage, shard) tasks, then the resume run over the same
root, for several sizes. What grows with the number of task runs, and whether it grows linearly:

* CPU per task of the flow process and of the Prefect server, and the wall time;
* the flow process's memory: resident set after imports and a warm-up run, and its peak during each run
  (sampled every 0.1 s), i.e. what a worker node or the process running ``motionforge run`` needs;
* the Prefect server's database growth per task run, split into events (with their resources and indexes)
  and the rest (task runs, their states, logs).

Each size runs in a fresh child process with a fresh Prefect database (SQLite under ``--dir``, or with
``--postgres`` a PostgreSQL cluster started for it, as ``bench_orchestration.py --postgres``), ``ingest`` and
``scenes`` at shard size 1 over N distinct one-second videos (copies of one ffmpeg testsrc clip, each with its own
trailing MP4 ``free`` box, so each is a different file to ingest's duplicate check), 2N task runs per flow run.
The resume run finds every shard complete: nearly all of its cost is orchestration.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_orchestration_scale.py [--sizes 250,2500] [--dir /tmp/x]
        [--postgres] [--shards-per-task K] [--json out.json]

With ``--shards-per-task K`` the runs make one task run per K shards; the figures stay per (stage, shard).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402

import bench_orchestration as bo  # noqa: E402

EVENT_TABLES = ("events", "event_resources")  # and their indexes: Prefect's event store


def distinct_copies(folder: Path, n: int, source: Path) -> None:
    """``n`` different files of one video: each is the source with an MP4 ``free`` box (which readers skip)
    appended, holding the copy's number."""
    folder.mkdir(parents=True, exist_ok=True)
    data = source.read_bytes()
    for i in range(n):
        p = folder / f"v{i:06d}.mp4"
        if not p.exists():
            p.write_bytes(data + (16).to_bytes(4, "big") + b"free" + i.to_bytes(8, "big"))


def sqlite_size(home: Path) -> dict[str, int]:
    """Bytes of the temporary server's SQLite database, in all and in the event store (tables and indexes)."""
    db = home / "prefect.db"
    total = sum(p.stat().st_size for p in home.glob("prefect.db*"))
    events = 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
            owner = {name: tbl for name, tbl in c.execute("select name, tbl_name from sqlite_master")}
            for name, size in c.execute("select name, sum(pgsize) from dbstat group by name"):
                if owner.get(name, name) in EVENT_TABLES:
                    events += size
    except sqlite3.Error:  # a SQLite built without dbstat: the total only
        events = -1
    return {"total": total, "events": events}


def postgres_size(pg: bo.LocalPostgres) -> dict[str, int]:
    def q(sql: str) -> int:
        out = subprocess.run([*pg.as_user, str(pg.bin / "psql"), "-h", "127.0.0.1", "-p", str(pg.port), "-U",
                              "postgres", "-d", "prefect", "-Atc", sql], check=True, capture_output=True, text=True)
        return int(out.stdout.strip() or 0)

    names = ", ".join(f"'{t}'" for t in EVENT_TABLES)
    return {"total": q("select pg_database_size('prefect')"),
            "events": q(f"select coalesce(sum(pg_total_relation_size(oid)), 0) from pg_class "
                        f"where relname in ({names}) and relkind = 'r'")}


def recorded_task_runs() -> dict[str, int]:
    """Task runs the server holds, by state type (this size's database is fresh): what reached it."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        r = client._client.post("/task_runs/count", json={})  # no count method on the sync client
        total = int(r.json())
        states = {}
        for t in ("COMPLETED", "PENDING", "RUNNING", "FAILED", "CRASHED"):
            r = client._client.post("/task_runs/count", json={"task_runs": {"state": {"type": {"any_": [t]}}}})
            states[t] = int(r.json())
    return {"total": total, **{k: v for k, v in states.items() if v}}


class PeakRss:
    """The highest resident set of this process, sampled every 0.1 s in a thread."""

    def __init__(self):
        self.peak = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        me = psutil.Process()
        while True:
            self.peak = max(self.peak, me.memory_info().rss)
            time.sleep(0.1)

    def reset(self) -> int:
        self.peak = now = psutil.Process().memory_info().rss
        return now


def child(n: int, base: Path, postgres: bool) -> dict:
    home = base / f"prefect-home-{n}"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    pg = None
    if postgres:
        pg = bo.LocalPostgres(base / f"pg-{n}")
        os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = pg.start()
        bo.DATABASE = pg
    try:
        return _measure(n, base, home, pg)
    finally:
        if pg is not None:
            pg.stop()


def _measure(n: int, base: Path, home: Path, pg) -> dict:
    from dashboards.status import root_status
    from flows.pipeline import pipeline

    bo.make_videos(base / "source", 1)
    distinct_copies(base / "warm", 2, base / "source" / "v0000.mp4")
    distinct_copies(base / f"videos-{n}", n, base / "source" / "v0000.mp4")
    size = (lambda: postgres_size(pg)) if pg is not None else (lambda: sqlite_size(home))

    def run(out: Path, videos: Path):
        return bo.measure_flow(lambda: pipeline(input=str(videos), out=str(out), config=bo.config(),
                                                stages=bo.STAGES))

    rss = PeakRss()
    run(base / f"warm-out-{n}", base / "warm")  # starts the server, imports the engine and the stages
    bo.measure_idle()
    out = base / f"out-{n}"
    shutil.rmtree(out, ignore_errors=True)
    res: dict = {"videos": n, "tasks": len(bo.STAGES) * n, "database": "postgres" if pg else "sqlite"}
    db0 = size()
    for phase in ("first", "resume"):
        before = rss.reset()
        result, wall, (own, kids, srv) = run(out, base / f"videos-{n}")
        actions = sorted({r["action"] for r in result["results"]})
        res[phase] = {"wall_s": wall, "flow_cpu_s": own, "server_cpu_s": srv, "other_children_cpu_s": kids - srv,
                      "rss_before": before, "rss_peak": rss.peak, "shards": len(result["results"]),
                      "actions": actions, "db": size(), "task_runs_on_server": recorded_task_runs()}
    st = {s["stage"]: s["complete"] for s in root_status(str(out))["stages"]}
    assert st == {s: n for s in bo.STAGES}, st
    assert res["resume"]["actions"] == ["skipped-complete"], res["resume"]["actions"]
    res["db_before"] = db0
    shutil.rmtree(out, ignore_errors=True)
    return res


def _db_growth(r: dict, phase: str) -> dict[str, int]:
    prev = r["db_before"] if phase == "first" else r["first"]["db"]
    return {k: r[phase]["db"][k] - prev[k] for k in ("total", "events")}


def report(rows: list[dict]) -> None:
    mib = 2 ** 20
    print("\nper task run (2 per video: ingest, scenes): wall and CPU in ms, database growth in KiB; the flow "
          "process's resident set in MiB")
    print(f"{'videos':>7} {'tasks':>6} {'run':>7} | {'wall':>6} {'flow cpu':>8} {'server':>7} | {'rss before':>10} "
          f"{'peak':>6} | {'db/task':>7} {'of it events':>12}")
    for r in rows:
        for phase in ("first", "resume"):
            p, t, db = r[phase], r["tasks"], _db_growth(r, phase)
            ev = f"{db['events'] / t / 1024:.1f}" if p["db"]["events"] >= 0 else "?"
            print(f"{r['videos']:>7} {t:>6} {phase:>7} | {p['wall_s'] / t * 1e3:6.1f} {p['flow_cpu_s'] / t * 1e3:8.1f} "
                  f"{p['server_cpu_s'] / t * 1e3:7.1f} | {p['rss_before'] / mib:10.0f} {p['rss_peak'] / mib:6.0f} | "
                  f"{db['total'] / t / 1024:7.1f} {ev:>12}")
    for r in rows:
        print(f"task runs on the server after the {r['videos']}-video runs (warm-up included): first "
              f"{r['first']['task_runs_on_server']}, after the resume {r['resume']['task_runs_on_server']}")
    if len(rows) < 2:
        return
    a, b = rows[0], rows[-1]
    dt = b["tasks"] - a["tasks"]
    print(f"\nfrom {a['tasks']} to {b['tasks']} tasks:")
    for phase in ("first", "resume"):
        per = [(r[phase]["flow_cpu_s"] + r[phase]["server_cpu_s"]) / r["tasks"] for r in (a, b)]
        rss = ((b[phase]["rss_peak"] - b[phase]["rss_before"]) - (a[phase]["rss_peak"] - a[phase]["rss_before"])) / dt / 1024
        db = (_db_growth(b, phase)["total"] - _db_growth(a, phase)["total"]) / dt / 1024
        print(f"  {phase}: flow process + server CPU per task {per[0] * 1e3:.1f} -> {per[1] * 1e3:.1f} ms ({per[1] / per[0]:.2f}x; "
              f"1.0 is linear in the number of tasks; the first run's includes the stages' work); the run's RSS "
              f"growth {rss:+.1f} KiB per extra task; database {db:+.1f} KiB per extra task")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="250,2500", help="videos per flow run, comma-separated (tasks: twice that)")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "motionforge-bench-scale")
    ap.add_argument("--postgres", action="store_true", help="a PostgreSQL database for each size's server")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--shards-per-task", type=int, default=1, help="runtime.shards_per_task of the runs")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    bo.SHARDS_PER_TASK[0] = args.shards_per_task
    if os.environ.get("PREFECT_API_URL"):
        raise SystemExit("this benchmark measures a server it starts itself (and its database); unset PREFECT_API_URL")
    args.dir.mkdir(parents=True, exist_ok=True)
    if args.child is not None:
        res = child(args.child, args.dir, args.postgres)
        (args.dir / f"result-{args.child}.json").write_text(json.dumps(res))
        return
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        t0 = time.perf_counter()
        log = args.dir / f"child-{n}.log"
        with log.open("wb") as f:
            done = subprocess.run([sys.executable, __file__, "--child", str(n), "--dir", str(args.dir),
                                   "--shards-per-task", str(args.shards_per_task)]
                                  + (["--postgres"] if args.postgres else []), stdout=f, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"the run of {n} videos failed ({done.returncode}); its log, {log}, ends:\n"
                             + log.read_text(errors="replace")[-3000:])
        rows.append(json.loads((args.dir / f"result-{n}.json").read_text()))
        print(f"{n} videos done in {time.perf_counter() - t0:.0f} s", flush=True)
    report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
