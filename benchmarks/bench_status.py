"""`motionforge status` on a large output root, built synthetically (no videos are processed).

Writes a root with an ingest plan of N shards (one video URI each), the manifest, and complete markers for
``ingest`` and ``scenes`` on every shard (plus a few stale and pending ones, so every state is exercised),
then times:

1. ``dashboards.status.root_status`` in-process (the work ``status`` does), best of ``--repeat``;
2. the CLI end to end (``python -m flows.cli status --out ROOT --no-server``, a fresh process: imports
   included): once with no marker index (it is built), once after every markers folder was touched (each marker's
   stamp is checked against the index, none is read), then best of ``--repeat`` with the index current.

Target: the CLI answers in under 2 s at 10,000 shards. The root is cached under --dir and reused.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_status.py [--shards 10000] [--repeat 3] [--dir /tmp/x] [--dag full]
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage.manifest import record_plan, record_stage_config  # noqa: E402
from storage.root import OutputRoot  # noqa: E402


def build_root(path: Path, n: int) -> OutputRoot:
    from stages.runner import plan_fingerprint

    root = OutputRoot(str(path))
    done = path / ".complete"
    if done.exists() and done.read_text() == str(n):
        return root
    record_plan(root, {"version": 1, "shard_size": 1, "input": "/synthetic",
                       "shards": [[f"/synthetic/video-{k:06d}.mp4"] for k in range(n)]})
    hashes = {"ingest": "a" * 16, "scenes": "b" * 16}
    record_stage_config(root, "ingest", hashes["ingest"], {}, [])
    record_stage_config(root, "scenes", hashes["scenes"], {}, ["ingest"])
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    for stage in ("ingest", "scenes"):
        (path / stage / "_markers").mkdir(parents=True, exist_ok=True)
    for k in range(n):
        fp_ingest = uuid.uuid4().hex
        markers = {
            "ingest": {"inputs": {"plan": plan_fingerprint(root, k)}, "fingerprint": fp_ingest},
            "scenes": {"inputs": {"ingest": fp_ingest}, "fingerprint": uuid.uuid4().hex},
        }
        for stage, m in markers.items():
            if stage == "scenes" and k % 1000 == 999:
                continue  # pending
            chash = hashes[stage] if not (stage == "scenes" and k % 1000 == 998) else "c" * 16  # stale
            body = {"stage": stage, "shard": k, "config_hash": chash, **m, "rows": 1, "ok": 1, "error": 0,
                    "skipped": 0, "top_errors": [], "seconds": 0.1, "created_at": now}
            (path / stage / "_markers" / f"shard-{k:05d}.json").write_text(json.dumps(body))
    done.write_text(str(n))
    return root


def build_full_root(path: Path, n: int) -> OutputRoot:
    """A root of ``n`` shards with a complete marker for every registered stage (the whole DAG: 14 per-shard
    stages and the global ``finalize``), each written from its input shards' markers through the runner's own
    ``input_fingerprints`` (external inputs included), so every shard is complete; then one stage's config
    changed (``check``: it and ``tasks`` are stale on every shard) and 1 in 1,000 ``qgen`` shards left pending."""
    from stages.registry import STAGE_MODULES, get_stage
    from stages.runner import input_fingerprints

    root = OutputRoot(str(path))
    done = path / ".complete"
    if done.exists() and done.read_text() == f"full {n}":
        return root
    record_plan(root, {"version": 1, "shard_size": 1, "input": "/synthetic",
                       "shards": [[f"/synthetic/video-{k:06d}.mp4"] for k in range(n)]})
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    for i, name in enumerate(STAGE_MODULES):
        st = get_stage(name)
        chash = f"{i:x}" * 16
        (path / name / "_markers").mkdir(parents=True, exist_ok=True)
        for k in ([0] if st.scope == "global" else range(n)):
            if name == "qgen" and k % 1000 == 999:
                continue  # pending (and so are ffilter, review and finalize there: written below only if ready)
            try:
                inputs = input_fingerprints(st, root, k)
            except Exception:  # noqa: BLE001 -- an input shard left pending: this one cannot be written
                continue
            body = {"stage": name, "shard": k, "config_hash": chash, "inputs": inputs,
                    "fingerprint": uuid.uuid4().hex, "rows": 4, "ok": 3, "error": 1, "skipped": 0,
                    "top_errors": [[f"{name} failed on clip {k}: synthetic", 1]], "seconds": 0.1, "created_at": now}
            (path / name / "_markers" / f"shard-{k:05d}.json").write_text(json.dumps(body))
        record_stage_config(root, name, ("e" * 16) if name == "check" else chash, {}, list(st.inputs))
    done.write_text(f"full {n}")
    return root


def remote_copy(local: Path, latency_s: float, on_read=None) -> str:
    """A URL of a copy of ``local`` in fsspec's memory store, behind a filesystem (protocol ``slowmarkers``) whose
    marker reads each take ``latency_s``, as on object storage; ``on_read(+1 / -1)`` is told when one starts and
    ends. The caller removes the copy (``fsspec.filesystem("memory").rm(path, recursive=True)``)."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class SlowMarkers(MemoryFileSystem):  # the memory store (shared by its instances); slow marker reads
        protocol = "slowmarkers"

        @classmethod
        def _strip_protocol(cls, path):
            return MemoryFileSystem._strip_protocol(path.removeprefix("slowmarkers://"))

        def cat_file(self, path, start=None, end=None, **kw):
            if "/_markers/" in path:
                if on_read:
                    on_read(+1)
                time.sleep(latency_s)
                if on_read:
                    on_read(-1)
            return super().cat_file(path, start, end, **kw)

    fsspec.register_implementation("slowmarkers", SlowMarkers, clobber=True)
    base = f"/bench-status-{uuid.uuid4().hex}"
    mem = MemoryFileSystem()
    for p in local.rglob("*"):
        if p.is_file():
            mem.pipe_file(f"{base}/{p.relative_to(local)}", p.read_bytes())
    return f"slowmarkers://{base}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--dag", choices=["two", "full"], default="two",
                    help="two: markers of ingest and scenes only; full: every registered stage (about 14x the markers)")
    ap.add_argument("--remote-latency-ms", type=float, default=0.0,
                    help="also time root_status on an in-memory copy whose marker reads each take this long")
    args = ap.parse_args()
    base = args.dir or Path(tempfile.gettempdir()) / f"motionforge-bench-status-{args.dag}-{args.shards}"
    t0 = time.perf_counter()
    (build_full_root if args.dag == "full" else build_root)(base, args.shards)
    print(f"root {base} with {args.shards} shards ready in {time.perf_counter() - t0:.1f}s")

    from dashboards.status import root_status

    best = float("inf")
    for _ in range(args.repeat):
        t = time.perf_counter()
        st = root_status(str(base))
        best = min(best, time.perf_counter() - t)
    by = {s["stage"]: s for s in st["stages"]}
    exp = args.shards // 1000
    assert by["ingest"]["complete"] == args.shards, by["ingest"]
    if args.dag == "full":
        assert by["check"]["stale"] == by["tasks"]["stale"] == args.shards, (by["check"], by["tasks"])
        assert by["qgen"]["pending"] == by["review"]["pending"] == exp and by["finalize"]["pending"] == 1, by["qgen"]
        assert by["describe"]["complete"] == args.shards, by["describe"]
        markers = sum(s["complete"] + s["stale"] for s in st["stages"])
    else:
        assert by["scenes"]["pending"] == exp and by["scenes"]["stale"] == exp, by["scenes"]
        markers = by["ingest"]["complete"] + by["scenes"]["complete"] + by["scenes"]["stale"]
    print(f"root_status in-process: {best:.3f}s over {markers} markers (" + ", ".join(
        f"{s['stage']} {s['complete']}/{s['stale']}/{s['pending']}" for s in st["stages"]) + " complete/stale/pending)")

    if args.remote_latency_ms:
        from fsspec.implementations.memory import MemoryFileSystem

        url = remote_copy(base, args.remote_latency_ms / 1000)
        t = time.perf_counter()
        remote = root_status(url)
        took = time.perf_counter() - t
        MemoryFileSystem().rm(url.removeprefix("slowmarkers://"), recursive=True)
        assert remote["stages"] == st["stages"]
        n = sum(s["complete"] + s["stale"] for s in st["stages"])
        print(f"root_status on a remote copy, {args.remote_latency_ms:g} ms per marker read: {took:.2f}s "
              f"({n} markers; one after another would wait {n * args.remote_latency_ms / 1000:.1f}s)")

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PREFECT_API_URL", None)

    def cli() -> tuple[float, str]:
        t = time.perf_counter()
        shown = subprocess.run([sys.executable, "-m", "flows.cli", "status", "--out", str(base), "--no-server"],
                               env=env, check=True, capture_output=True, text=True).stdout
        return time.perf_counter() - t, shown

    if base.joinpath("_manifest.json").exists():  # a local root: the marker index (storage/marker_index.py)
        from storage.marker_index import drop_index

        drop_index(OutputRoot(str(base)))
        cold, first = cli()
        print(f"`motionforge status`, no marker index yet (it reads every marker and writes the index): {cold:.3f}s")
        for name in os.listdir(base):  # every markers folder changed since, no marker: each marker's stamp is checked
            if (base / name / "_markers").is_dir():
                os.utime(base / name / "_markers")
        stamped, shown = cli()
        assert shown == first
        print(f"`motionforge status`, every markers folder touched since (stamps checked, no marker read): {stamped:.3f}s")
    cli_best, runs = float("inf"), []
    for _ in range(args.repeat):
        took, _ = cli()
        runs.append(took)
        cli_best = min(cli_best, took)
    print(f"`motionforge status` end to end (fresh process, imports included): {cli_best:.3f}s best; "
          f"{', '.join(f'{x:.2f}' for x in runs)} s  (target < 2 s)")
    imp = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.cli", "status", "--out", str(base),
                          "--no-server"], env=env, check=True, capture_output=True, text=True).stderr
    top, heavy = 0.0, {}
    for line in imp.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cum, name = line.split("|")
        if not name.startswith("  "):  # a top-level import (nested ones are indented further)
            top += int(cum) / 1e6
        if name.strip() in ("torch", "transformers", "pandas", "prefect", "pyarrow.dataset", "experts"):
            heavy[name.strip()] = int(cum) / 1e6
    print(f"imports of that command (python -X importtime, top-level cumulative): {top:.3f}s; heavy modules imported: "
          f"{', '.join(f'{k} {v:.2f}s' for k, v in heavy.items()) or 'none'}")
    digest = hashlib.sha256(json.dumps(st, sort_keys=True, default=str).encode()).hexdigest()[:12]
    print(f"status digest {digest}")


if __name__ == "__main__":
    main()
