"""What a resumed run does before it makes any task run: the check of every (stage, shard) for "complete and up to
date" (``flows.pipeline._complete_or_none``, the runner's ``complete_outcome``), over a finished root.

The root is one `benchmarks/bench_reads_at_scale.py` builds (the demo root replicated to N shards, every stage
complete; default: its 1,500-shard root, made first when absent). The check runs stage by stage in pipeline
order, as ``flows.pipeline._submit`` runs it for shards with no task run upstream: on the calling thread for a
local root (what the flow does now), or over ``PRECHECK_THREADS`` threads (``--threads``: what it did before, and
still does for a remote root). The replicated root's ingest markers record the source plan's entries, so its
ingest shards (and the global finalize) check as not complete; every other check runs to its end, as on a
finished root.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_resume_check.py [--root DIR] [--threads] [--repeat 2]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "motionforge-bench-reads" / "shards-1500")
    ap.add_argument("--threads", action="store_true", help="check over PRECHECK_THREADS threads")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if not (args.root / "_pipeline.json").exists():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_reads_at_scale.py"), "--shards",
                        args.root.name.split("-")[-1], "--readers", "report"], check=True, cwd=REPO)

    from flows.pipeline import PRECHECK_THREADS, _complete_or_none, validated_config
    from stages.registry import STAGE_MODULES, get_stage
    from stages.runner import plan_shards
    from storage.root import OutputRoot

    root = OutputRoot(str(args.root))
    pc = validated_config(json.loads((args.root / "_pipeline.json").read_text()))
    shards = plan_shards(root)
    for _ in range(args.repeat):
        t, c = time.perf_counter(), time.process_time()
        n = done = 0
        with concurrent.futures.ThreadPoolExecutor(PRECHECK_THREADS) as pool:
            for name in STAGE_MODULES:
                st = get_stage(name)
                ks = [0] if st.scope == "global" else shards
                check = (lambda k, st=st, c=pc.stage_config(name): _complete_or_none(st, root, c, k))
                res = list(pool.map(check, ks) if args.threads else map(check, ks))
                n += len(ks)
                done += sum(r is not None for r in res)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        print(f"{'threads' if args.threads else 'one thread'}: {n} (stage, shard) checked, {done} complete: "
              f"wall {wall:.2f} s, CPU {cpu:.2f} s, {wall / n * 1e6:.0f} us each")


if __name__ == "__main__":
    main()
