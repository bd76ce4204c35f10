"""The readers that go over a whole output root, on a root of many shards: the dataset report (written at the
end of every flow run, in the flow process), `export hf`, and the iMOVE-IT explorer of `review serve` (its
instance list, then one instance opened).

No video is processed. A real root made by `motionforge demo` (``--source``; made first when absent) is
replicated into ``--shards`` shards: shard k of every stage is the demo's shard ``k % S`` with its ids
suffixed by ``~k`` (so counts of distinct videos, clips and instances grow with k), its marker copied with
the new shard number, and the ingest plan listing ``--shards`` shards. The global ``finalize`` table is
repeated the same number of times. Each track row gets ``--track-points`` points (the demo's clips are a few
seconds at 4 fps; the paper profile tracks at 10 fps over clips of up to 60 s).

Each reader runs in a fresh child process, one size after another, and prints wall, CPU and peak RSS above
the RSS after imports:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_reads_at_scale.py [--shards 30,300,1500] \
        [--source /tmp/motionforge-demo/root] [--readers report,export_hf,explorer]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

READERS = ("report", "export_hf", "explorer")
ID_SUFFIX_COLUMNS = ("video_id", "clip_id", "instance_id", "sample_id", "question_id", "key")


def _demo_root(source: Path | None) -> Path:
    if source is not None:
        return source
    out = Path(tempfile.gettempdir()) / "motionforge-bench-reads-demo"
    if not (out / "root" / "_manifest.json").exists():
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "flows.cli", "demo", "--out", str(out)], cwd=REPO, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL)
    return out / "root"


def _suffixed(table, k: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    for name in ID_SUFFIX_COLUMNS:
        if name in table.column_names and pa.types.is_string(table.schema.field(name).type):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.schema.field(i), pc.binary_join_element_wise(
                table[name], pa.scalar(str(k)), "~"))
    return table


def _with_points(table, n: int):
    """Each track row's points list stretched to ``n`` entries (its own points repeated, times shifted)."""
    import pyarrow as pa

    if "points" not in table.column_names or n <= 0:
        return table
    rows = table.column("points").to_pylist()
    out = []
    for pts in rows:
        if not pts:
            out.append(pts)
            continue
        out.append([{**pts[j % len(pts)], "t_s": pts[0]["t_s"] + j / 10.0} for j in range(n)])
    i = table.schema.get_field_index("points")
    return table.set_column(i, table.schema.field(i), pa.array(out, table.schema.field(i).type))


def build_root(source: Path, dest: Path, shards: int, track_points: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stamp = dest / ".built"
    want = json.dumps({"source": str(source), "shards": shards, "points": track_points})
    if stamp.exists() and stamp.read_text() == want:
        return
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("_manifest.json", "_pipeline.json"):
        if (source / name).exists():
            shutil.copy(source / name, dest / name)
    for stage_dir in sorted(p for p in source.iterdir() if p.is_dir() and (p / "_markers").is_dir()):
        src_shards = sorted(int(p.stem.split("-")[1]) for p in stage_dir.glob("shard-*.parquet"))
        out = dest / stage_dir.name
        (out / "_markers").mkdir(parents=True)
        if stage_dir.name == "ingest":
            plan = json.loads((stage_dir / "_plan.json").read_text())
            plan["shards"] = [[f"{u}~{k}" for u in plan["shards"][k % len(plan["shards"])]] for k in range(shards)]
            (out / "_plan.json").write_text(json.dumps(plan))
        tables = {s: _with_points(pq.read_table(stage_dir / f"shard-{s:05d}.parquet"), track_points)
                  for s in src_shards}
        markers = {s: json.loads((stage_dir / "_markers" / f"shard-{s:05d}.json").read_text()) for s in src_shards}
        if len(src_shards) == 1 and src_shards == [0]:  # a global stage: one shard, its rows repeated
            table = pa.concat_tables([_suffixed(tables[0], k) for k in range(shards // 3 or 1)])
            pq.write_table(table, out / "shard-00000.parquet", compression="zstd")
            m = dict(markers[0], rows=table.num_rows, ok=markers[0]["ok"] * (shards // 3 or 1))
            (out / "_markers" / "shard-00000.json").write_text(json.dumps(m))
            continue
        for k in range(shards):
            s = src_shards[k % len(src_shards)]
            pq.write_table(_suffixed(tables[s], k), out / f"shard-{k:05d}.parquet", compression="zstd")
            (out / "_markers" / f"shard-{k:05d}.json").write_text(json.dumps(dict(markers[s], shard=k)))
    stamp.write_text(want)


def _child(reader: str, root: str) -> None:
    """Run one reader over ``root`` and print a JSON line of measurements."""
    import importlib

    from dashboards import review_data as rd
    from dashboards.report import collect, write_report  # imported before the RSS baseline, as is
    from stages.export.hf import export_hf
    from storage.root import OutputRoot

    importlib.import_module("datasets")  # export_hf imports it lazily: an import, not the reader's memory

    def rss_now() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    base_rss = rss_now()
    t0, c0 = time.perf_counter(), time.process_time()
    extra = {}
    if reader == "report":
        data = collect(root)
        write_report(root, to=Path(root) / "_report" / "bench.html", data=data)
        extra = {"samples": (data.get("imove_it") or {}).get("samples"), "plots": len(data["plots"])}
    elif reader == "export_hf":
        to = Path(tempfile.mkdtemp(prefix="bench-hf-")) / "hf"
        res = export_hf(OutputRoot(root), to)
        extra = {"configs": len(res.configs), "files": sum(1 for _ in to.rglob("*.parquet")),
                 "mib": round(sum(p.stat().st_size for p in to.rglob("*.parquet")) / 2**20, 1)}
        shutil.rmtree(to.parent, ignore_errors=True)
    elif reader == "explorer":
        import pyarrow.compute as pc

        from dashboards.server import PAGE_ROWS, _column_counts

        tables = rd.Tables(OutputRoot(root))
        table = rd.instance_table(tables)  # what the explorer's first request does: the table, facets, one page
        facets = {name: _column_counts(table[name]) for name in ("status", "reason")}
        page = rd.instance_rows(table.slice(0, PAGE_ROWS))
        listed = time.perf_counter() - t0
        kept = table.filter(pc.equal(table["status"], "in dataset"))  # one with a track and samples
        kept = (kept if kept.num_rows else table)["instance_id"].to_pylist()
        detail = rd.imove_instance(tables, kept[-1])
        opened = time.perf_counter() - t0 - listed
        t1 = time.perf_counter()
        rd.imove_instance(tables, kept[0])  # a later request: the list is built already
        extra = {"instances": table.num_rows, "page": len(page), "statuses": len(facets["status"]),
                 "list_s": round(listed, 2), "open_first_s": round(opened, 2),
                 "open_next_s": round(time.perf_counter() - t1, 2),
                 "track_points": len((detail["track"] or {}).get("points") or [])}
    else:
        raise SystemExit(f"unknown reader {reader}")
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"reader": reader, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                      "rss_after_imports_mib": round(base_rss), "peak_rss_mib": round(peak),
                      "peak_above_imports_mib": round(peak - base_rss), **extra}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", default="30,300,1500")
    ap.add_argument("--source", type=Path, default=None, help="a demo output root (default: make one)")
    ap.add_argument("--readers", default=",".join(READERS))
    ap.add_argument("--track-points", type=int, default=150)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "motionforge-bench-reads")
    ap.add_argument("--child", nargs=2, metavar=("READER", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    import pyarrow.parquet as pq

    source = _demo_root(args.source)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    for n in (int(x) for x in args.shards.split(",")):
        dest = args.dir / f"shards-{n}"
        t = time.perf_counter()
        build_root(source, dest, n, args.track_points)
        stored = sum(p.stat().st_size for p in dest.rglob("*.parquet"))
        in_memory = sum(pq.ParquetFile(p).metadata.num_rows for p in (dest / "track").glob("*.parquet"))
        print(f"{n} shards: root ready in {time.perf_counter() - t:.1f}s; {stored / 2**20:.1f} MiB of Parquet; "
              f"{in_memory} track rows", flush=True)
        for reader in args.readers.split(","):
            r = subprocess.run([sys.executable, __file__, "--child", reader, str(dest)], env=env, cwd=REPO,
                               capture_output=True, text=True)
            if r.returncode:
                print(f"  {reader}: failed rc {r.returncode}: {r.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            print("  " + r.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
