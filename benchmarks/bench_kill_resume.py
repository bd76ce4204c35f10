"""Kill/resume trials: a real ``motionforge run`` (tiny profile, every stage) SIGKILLed at random times, resumed,
and compared with a clean run of the same inputs.

Two clean runs come first: the first fills the model caches, the second must give exactly the first's rows (else
the comparison below would mean nothing) and its wall time is the kill window. Each trial starts the CLI on a
fresh output root in its own process group, SIGKILLs the whole group (the CLI and any worker processes) after a
random delay drawn uniformly from [--min-s, the warm clean run's wall time], then
runs the same command again to resume. ``--kills-per-trial K`` kills the same root K times before the resume.
The resumed root is compared, stage by stage, with the clean root: every row, every column but ``created_at``
(paths under the root are compared relative to it). The runs talk to one Prefect server started here, so the
script also counts flow runs of killed runs that the resume left in a non-final state.

Reports: kills, resume failures (the resume exited non-zero), rows lost (in the clean run, missing after
resume), rows duplicated (more copies than in the clean run), rows differing (in neither), temp files and
locks left behind, flow runs left running. Target: all 0.

    .venv/bin/python benchmarks/bench_kill_resume.py [--kills 20] [--videos 3] [--shard-size 1] [--seed 0]
        [--kills-per-trial 1] [--min-s 2] [--json out.json] [--keep DIR]

CPU heavy: each trial is a partial and a full tiny run (about 1-2 minutes on 2 cores). ``--kills 5`` for a
quick look.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _cli(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _rows(root: Path) -> dict[str, collections.Counter]:
    """stage -> multiset of rows (JSON, created_at dropped, the root's path replaced by <ROOT>)."""
    import pyarrow.dataset as ds

    out: dict[str, collections.Counter] = {}
    prefix = str(root)
    for stage in sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        t = ds.dataset(str(root / stage), format="parquet").to_table()
        if "created_at" in t.column_names:
            t = t.drop_columns(["created_at"])
        rows = collections.Counter()
        for r in t.to_pylist():
            rows[json.dumps(r, sort_keys=True, default=str).replace(prefix, "<ROOT>")] += 1
        out[stage] = rows
    return out


def compare(clean: dict[str, collections.Counter], got: dict[str, collections.Counter]) -> dict[str, dict[str, int]]:
    res = {}
    for stage in sorted(set(clean) | set(got)):
        c, g = clean.get(stage, collections.Counter()), got.get(stage, collections.Counter())
        lost = sum((c - g).values())
        dup = sum(n - c[k] for k, n in g.items() if k in c and n > c[k])
        differing = sum(n for k, n in g.items() if k not in c)
        if lost or dup or differing:
            res[stage] = {"lost": lost, "duplicated": dup, "differing": differing}
    return res


def _leftovers(root: Path) -> tuple[int, bool]:
    temps = sum(1 for _, _, fs in os.walk(root) for n in fs if n.startswith(".tmp-"))
    return temps, (root / "_lock").exists()


def _open_runs(api: str) -> list[str]:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    runs = []
    with temporary_settings(updates={PREFECT_API_URL: api}):
        with get_client(sync_client=True) as client:
            while True:  # the server hands out at most 200 per page
                page = client.read_flow_runs(limit=200, offset=len(runs))
                runs += page
                if len(page) < 200:
                    break
    return [f"{r.name}: {r.state.name}" for r in runs if r.state is not None and not r.state.is_final()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs in all")
    ap.add_argument("--kills-per-trial", type=int, default=1, help="kills of the same root before its resume")
    ap.add_argument("--videos", type=int, default=3)
    ap.add_argument("--shard-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-s", type=float, default=2.0, help="earliest kill, seconds after the start")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp folder)")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below stops the server and the run

    from stages.synth.videos import SynthConfig, render_dataset
    from tests._prefect_server import prefect_env, start_server, stop

    work = a.keep or Path(tempfile.mkdtemp(prefix="mf-kill-resume-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    videos = work / "videos"
    if not videos.exists():
        render_dataset(videos, a.videos, a.seed, SynthConfig())
    server, api = start_server(work / "prefect-home", work / "prefect-server.log")
    env = prefect_env(work / "prefect-home", api)
    env.update(PYTHONPATH=str(REPO), MOTIONFORGE_INPUT_CACHE=str(work / "input-cache"),
               MOTIONFORGE_TINY_CACHE=str(work / "tiny-cache"), PREFECT_LOGGING_LEVEL="WARNING")
    current: list = [None]  # the CLI run in flight, killed if this script is stopped
    report: dict = {"kills": 0, "trials": [], "resume_failures": 0, "lost": 0, "duplicated": 0, "differing": 0,
                    "temp_files_left": 0, "locks_left": 0}
    try:
        def run_args(out: Path) -> list[str]:
            return ["run", "--input", str(videos), "--out", str(out), "--profile", "tiny",
                    "--shard-size", str(a.shard_size)]

        clean_s = 0.0
        for name in ("clean", "clean-warm"):
            clean = work / name
            shutil.rmtree(clean, ignore_errors=True)
            t0 = time.monotonic()
            current[0] = _cli(run_args(clean), env, work / f"{name}.log")
            rc = current[0].wait()
            clean_s = time.monotonic() - t0
            if rc != 0:
                print(f"{name} run failed (exit {rc}); see {work / f'{name}.log'}")
                return 2
            print(f"{name} run: {clean_s:.1f} s", flush=True)
        want = _rows(work / "clean")
        drift = compare(want, _rows(work / "clean-warm"))
        if drift:
            print(f"two clean runs differ, so kill trials cannot be compared with them: {drift}")
            return 2
        print(f"clean runs agree: {sum(sum(c.values()) for c in want.values())} rows in {len(want)} stages; "
              f"kill window [{a.min_s}, {clean_s:.1f}] s", flush=True)
        trial = 0
        while report["kills"] < a.kills:
            out = work / f"trial-{trial:03d}"
            shutil.rmtree(out, ignore_errors=True)
            log = work / f"trial-{trial:03d}.log"
            delays = []
            for _ in range(min(a.kills_per_trial, a.kills - report["kills"])):
                delay = rng.uniform(a.min_s, max(a.min_s + 1, clean_s))
                proc = current[0] = _cli(run_args(out), env, log)
                try:
                    proc.wait(timeout=delay)
                    delays.append(f"{delay:.1f}s (finished first)")
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    report["kills"] += 1
                    delays.append(f"{delay:.1f}s")
            t1 = time.monotonic()
            current[0] = _cli(run_args(out), env, log)
            rc = current[0].wait()
            entry = {"trial": trial, "killed_at": delays, "resume_exit": rc, "resume_s": round(time.monotonic() - t1, 1)}
            if rc != 0:
                report["resume_failures"] += 1
                entry["log_tail"] = log.read_text(errors="replace")[-1500:]
            else:
                diff = compare(want, _rows(out))
                entry["diff"] = diff
                for v in diff.values():
                    for k in ("lost", "duplicated", "differing"):
                        report[k] += v[k]
            temps, lock = _leftovers(out)
            entry.update(temp_files_left=temps, lock_left=lock)
            report["temp_files_left"] += temps
            report["locks_left"] += lock
            report["trials"].append(entry)
            print(f"trial {trial}: killed at {', '.join(delays)}; resume exit {rc} in {entry['resume_s']} s; "
                  f"diff {entry.get('diff', 'n/a')}; temp files {temps}; lock left {lock}", flush=True)
            trial += 1
        report["flow_runs_not_final"] = _open_runs(api)
        report["flow_runs_checked"] = True
    finally:
        if current[0] is not None and current[0].poll() is None:
            _kill_group(current[0])
        stop(server)
    report["clean_run_s"] = round(clean_s, 1)
    print(f"\n{report['kills']} kills over {len(report['trials'])} trials: {report['resume_failures']} resume failures, "
          f"{report['lost']} rows lost, {report['duplicated']} duplicated, {report['differing']} differing; "
          f"{report['temp_files_left']} temp files and {report['locks_left']} locks left; "
          f"{len(report['flow_runs_not_final'])} flow runs left non-final {report['flow_runs_not_final'][:5]}")
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    bad = (report["resume_failures"] + report["lost"] + report["duplicated"] + report["differing"]
           + report["temp_files_left"] + report["locks_left"] + len(report["flow_runs_not_final"]))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
