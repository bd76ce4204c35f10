"""Clip files of the exports (`export imove-it`, `export motionbench`): cutting serially against in parallel,
and a second export into the same folder.

Makes ``--sources`` videos (ffmpeg testsrc2, ``--size``, ``--seconds`` long, one keyframe per 10 s, so the
clips below start between keyframes and are re-encoded, as most clips are), then writes ``--clips`` clips
of 2 s from each with :func:`stages.export.media.write_clips`:

1. ``workers=1`` into a fresh folder: one clip after another, as every export did before;
2. default workers (one per core) into another fresh folder;
3. again into folder 2: nothing changed, nothing should be cut.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_export_clips.py [--sources 8] [--clips 3] [--size 1280x720]
"""
from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.export.media import ClipSource, export_workers, write_clips  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-export-clips-"))
    try:
        srcs = []
        for i in range(args.sources):
            p = work / f"src{i}.mp4"
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                            f"testsrc2=size={args.size}:rate=30:duration={args.seconds}", "-c:v", "libx264",
                            "-preset", "ultrafast", "-g", "300", "-pix_fmt", "yuv420p", str(p)], check=True)
            srcs.append(str(p))
        step = max(0.5, (args.seconds - 2.0) / max(args.clips, 1))
        clips = [ClipSource(f"s{i}c{k}.mp4", s, 0.4 + k * step, 0.4 + k * step + 2.0)
                 for i, s in enumerate(srcs) for k in range(args.clips)]
        print(f"{len(clips)} clips of 2 s from {len(srcs)} {args.size} sources; {export_workers()} cores", flush=True)
        rows = []
        for label, folder, workers in (("serial (workers=1, as before)", "one", 1),
                                       (f"parallel (workers={export_workers()})", "many", None),
                                       ("again into the parallel folder", "many", None)):
            t = time.perf_counter()
            done, errors = write_clips(clips, work / folder / "videos", workers=workers)
            wall = time.perf_counter() - t
            assert not errors, errors
            rows.append((label, wall, dict(sorted(collections.Counter(done.values()).items()))))
            print(f"  {label}: {wall:.2f} s  modes {rows[-1][2]}", flush=True)
        print(f"parallel / serial wall: {rows[1][1] / rows[0][1]:.2f}x; second export: {rows[2][1]:.3f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
