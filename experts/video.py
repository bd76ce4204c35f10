"""Video probing (ffprobe) and streaming frame reading (PyAV).

``probe`` answers "is this a usable video, and what is it" with a reason a person understands when it is
not; the ingest stage turns a :class:`VideoProbeError` into an error row. ``iter_frames`` decodes a span as
a stream: one decoded frame is alive at a time (plus the previous one while choosing the nearest frame to
a target time), so memory does not grow with video length.

Conventions:

* ``t_s`` is the presentation time in seconds since the first frame of the video stream, computed from
  ``pts * time_base`` (never ``index / fps``), so variable-frame-rate videos get true timestamps.
* ``index`` is the frame's position in presentation order within the whole source video.
* Frames come out upright: the display matrix (rotation metadata) is applied, and so is a non-square
  sample aspect ratio, so ``image.shape[:2] == (height, width)`` of :class:`VideoProbe`.
* ``rotation_deg`` is counter-clockwise, as ffprobe's display-matrix ``rotation`` reports it.
"""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

PathLike = str | os.PathLike

# Box types that start an ISO-BMFF (mp4/mov) file; used to tell a truncated mp4 from a non-media file when
# ffprobe reports "moov atom not found" for both.
_ISOBMFF_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")


class VideoProbeError(RuntimeError):
    """A video file cannot be used. ``reason`` is written for people (it ends up in an error row)."""

    def __init__(self, reason: str, path: PathLike | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{reason} [{self.path}]" if self.path else reason)


@dataclass(frozen=True)
class VideoProbe:
    """What ffprobe (plus a cheap decode check) says about one video file."""

    duration_s: float
    fps: float
    frame_count: int  # the container's count when it has one, otherwise round(duration_s * fps)
    width: int  # display size: after rotation and sample aspect ratio
    height: int
    codec: str
    rotation_deg: int  # counter-clockwise, one of 0, 90, 180, 270
    has_video_stream: bool
    has_audio_stream: bool
    size_bytes: int


class Frame(NamedTuple):
    """One decoded frame: source index, presentation time and an upright HxWx3 uint8 RGB image."""

    index: int
    t_s: float
    image: np.ndarray


# --------------------------------------------------------------------------------------------- probing


def _check_readable(path: Path) -> int:
    """Return the file size, or raise VideoProbeError for missing / directory / unreadable / empty files."""
    if not path.exists():
        raise VideoProbeError("file does not exist; check the path or the manifest entry", path)
    if path.is_dir():
        raise VideoProbeError("path is a directory, not a video file", path)
    if not os.access(path, os.R_OK):
        raise VideoProbeError("permission denied: this process cannot read the file; fix its permissions", path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise VideoProbeError(f"cannot stat the file ({exc.strerror or exc})", path) from exc
    if size == 0:
        raise VideoProbeError("file is empty (0 bytes); the download or copy probably failed, fetch it again", path)
    return size


def _sniff_failure(path: Path, message: str) -> str:
    """Turn an ffprobe/libav open failure into a reason, looking at the first bytes of the file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except PermissionError:
        return "permission denied: this process cannot read the file; fix its permissions"
    except OSError as exc:
        return f"cannot read the file ({exc.strerror or exc})"
    if "Permission denied" in message:
        return "permission denied: this process cannot read the file; fix its permissions"
    if head[4:8] in _ISOBMFF_BOXES and "moov atom not found" in message:
        return ("truncated or incomplete MP4: its index (moov atom) is missing, typically an interrupted "
                "download or recording; fetch the file again")
    try:
        text = head.decode("utf-8")
        looks_text = all(ch.isprintable() or ch in "\r\n\t" for ch in text)
    except UnicodeDecodeError:
        looks_text = False
    if looks_text:
        return "not a media file: it contains plain text (a renamed or mislabelled file?)"
    detail = message.strip().splitlines()[-1] if message.strip() else "no details"
    return f"not a media file or an unsupported container (ffprobe: {detail})"


def _ratio(text: str | None) -> float:
    if not text or text in ("0/0", "N/A"):
        return 0.0
    try:
        return float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        return 0.0


def _float(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _rotation_from_ffprobe(stream: dict) -> int:
    for side in stream.get("side_data_list") or []:
        if "rotation" in side:
            return _normalise_rotation(_float(side["rotation"]) or 0.0)
    # Legacy tag: "rotate" is clockwise, the display matrix is counter-clockwise.
    tag = _float((stream.get("tags") or {}).get("rotate"))
    return _normalise_rotation(-tag) if tag else 0


def _normalise_rotation(deg: float) -> int:
    return int(round(deg / 90.0)) * 90 % 360


def _run_ffprobe(path: Path, timeout_s: float) -> dict:
    cmd = ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError as exc:
        # An environment problem, not the item's: let the whole shard fail so it is fixed and retried.
        raise RuntimeError("ffprobe is not installed or not on PATH; run scripts/setup.sh") from exc
    except subprocess.TimeoutExpired as exc:
        raise VideoProbeError(
            f"ffprobe did not finish within {timeout_s:.0f}s; the file may be damaged or on a stalled filesystem",
            path) from exc
    if proc.returncode != 0:
        raise VideoProbeError(_sniff_failure(path, proc.stderr), path)
    try:
        return json.loads(proc.stdout or "{}")
    except json.JSONDecodeError as exc:
        raise VideoProbeError(f"ffprobe printed unreadable output ({exc}); probe the file by hand", path) from exc


def probe(path: PathLike, *, timeout_s: float = 30.0, check_decode: bool = True) -> VideoProbe:
    """Describe a video file, or raise :class:`VideoProbeError` saying why it cannot be used.

    With ``check_decode`` the first frame is decoded and the packets of the last seconds are read, which
    catches truncated and undecodable files without decoding the whole video.
    """
    p = Path(path)
    size = _check_readable(p)
    info = _run_ffprobe(p, timeout_s)
    streams = info.get("streams") or []
    fmt = info.get("format") or {}
    if fmt.get("format_name") == "tty":  # ffmpeg's ANSI-art demuxer accepts any text file
        raise VideoProbeError("not a media file: it contains plain text (a renamed or mislabelled file?)", p)
    videos = [s for s in streams if s.get("codec_type") == "video"
              and not (s.get("disposition") or {}).get("attached_pic")]
    has_audio = any(s.get("codec_type") == "audio" for s in streams)
    if not videos:
        if has_audio:
            raise VideoProbeError("no video stream: the file is audio-only (or has only cover art)", p)
        kinds = sorted({str(s.get("codec_type")) for s in streams}) or ["none"]
        raise VideoProbeError(f"no video stream (streams found: {', '.join(kinds)})", p)
    vs = videos[0]
    coded_w, coded_h = int(vs.get("width") or 0), int(vs.get("height") or 0)
    if coded_w <= 0 or coded_h <= 0:
        raise VideoProbeError(f"video stream has no frame size ({vs.get('codec_name')}); the stream is damaged", p)
    rotation = _rotation_from_ffprobe(vs)
    sar = _ratio(vs.get("sample_aspect_ratio")) or 1.0
    width, height = _display_size(coded_w, coded_h, sar, rotation)
    fps = _ratio(vs.get("avg_frame_rate")) or _ratio(vs.get("r_frame_rate"))
    stream_duration = _float(vs.get("duration"))
    duration = stream_duration or _float(fmt.get("duration")) or 0.0
    nb = vs.get("nb_frames")
    frame_count = int(nb) if nb and str(nb).isdigit() else int(round(duration * fps))
    if check_decode:
        _check_decodable(p, int(vs["index"]), duration, stream_duration is not None, fps)
    return VideoProbe(
        duration_s=float(duration), fps=float(fps), frame_count=frame_count, width=width, height=height,
        codec=str(vs.get("codec_name") or "unknown"), rotation_deg=rotation, has_video_stream=True,
        has_audio_stream=has_audio, size_bytes=size,
    )


def _check_decodable(path: Path, stream_index: int, duration_s: float, exact_duration: bool, fps: float) -> None:
    """Decode the first frame and read the packets of the last seconds; raise if either fails."""
    import av

    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise VideoProbeError(_sniff_failure(path, str(exc)), path) from exc
    with container:
        stream = next((s for s in container.streams.video if s.index == stream_index), container.streams.video[0])
        try:
            first = next(iter(container.decode(stream)), None)
        except av.FFmpegError as exc:
            raise VideoProbeError(f"undecodable: the first frame fails to decode ({exc})", path) from exc
        if first is None:
            raise VideoProbeError("undecodable: the video stream holds no frame that decodes (empty or corrupt)", path)
        if duration_s <= 0 or stream.time_base is None:
            return
        tb = float(stream.time_base)
        t0 = stream.start_time or 0
        # The container promises frames up to duration_s. Seek a few seconds before it and demux to the end:
        # a truncated file runs out of packets early. Demuxing without decoding keeps this cheap.
        tail_start = max(0.0, duration_s - 3.0)
        last_end = None
        try:
            container.seek(t0 + int(tail_start / tb), stream=stream, backward=True)
            for packet in container.demux(stream):
                if packet.pts is None or packet.size == 0:
                    continue
                if packet.is_corrupt:
                    raise VideoProbeError(
                        f"truncated or corrupt: damaged video packet at {(packet.pts - t0) * tb:.2f}s of the "
                        f"{duration_s:.2f}s the container declares; fetch the file again or re-encode it", path)
                end = (packet.pts - t0 + (packet.duration or 0)) * tb
                last_end = end if last_end is None else max(last_end, end)
        except av.FFmpegError as exc:
            raise VideoProbeError(f"undecodable data in the last seconds of the video ({exc}); "
                                  "the file is probably truncated, fetch it again", path) from exc
        frame_s = 1.0 / fps if fps > 0 else 0.1
        # A known stream duration is precise; a container-wide duration may include a longer audio track.
        tolerance = max(1.0, 2 * frame_s, 0.02 * duration_s) if exact_duration else max(2.0, 0.1 * duration_s)
        if last_end is None or last_end < duration_s - tolerance:
            got = 0.0 if last_end is None else last_end
            raise VideoProbeError(
                f"truncated: video data stops at {got:.2f}s of the {duration_s:.2f}s the container declares "
                "(interrupted download or copy?); fetch the file again", path)


# --------------------------------------------------------------------------------------------- reading


def _display_size(coded_w: int, coded_h: int, sar: float, rotation: int) -> tuple[int, int]:
    w = max(1, int(round(coded_w * sar))) if sar and abs(sar - 1.0) > 1e-6 else coded_w
    return (coded_h, w) if rotation in (90, 270) else (w, coded_h)


def _output_size(disp_w: int, disp_h: int, size: tuple[int, int] | None, short_side: int | None) -> tuple[int, int]:
    if size is not None:
        return int(size[0]), int(size[1])
    if short_side is not None:
        scale = short_side / min(disp_w, disp_h)
        return max(1, int(round(disp_w * scale))), max(1, int(round(disp_h * scale)))
    return disp_w, disp_h


def _open_video(path: PathLike) -> tuple[Any, Any]:
    """Open a file with PyAV and return (container, first video stream) or raise VideoProbeError."""
    import av

    p = Path(path)
    _check_readable(p)
    try:
        container = av.open(str(p))
    except av.FFmpegError as exc:
        raise VideoProbeError(_sniff_failure(p, str(exc)), p) from exc
    videos = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not videos:
        container.close()
        raise VideoProbeError("no video stream: the file is audio-only (or has only cover art)", p)
    return container, videos[0]


@functools.lru_cache(maxsize=16)
def _sorted_packet_pts(path: str, mtime_ns: int, size: int, stream_index: int) -> "np.ndarray":
    """Sorted pts of the stream's non-empty packets, demuxed (not decoded) once per file version."""
    import av

    with av.open(path) as container:
        stream = container.streams[stream_index]
        pts = [pkt.pts for pkt in container.demux(stream) if pkt.pts is not None and pkt.size > 0]
    return np.sort(np.asarray(pts, dtype=np.int64))


def _count_frames_before(path: PathLike, stream_index: int, pts: int) -> int:
    """Number of frames whose pts is below ``pts``. The packet index is demuxed once per file (and kept while
    the file is unchanged), so many seeks into one variable-frame-rate video cost one pass, not one each."""
    st = os.stat(path)
    table = _sorted_packet_pts(str(path), st.st_mtime_ns, st.st_size, stream_index)
    return int(np.searchsorted(table, pts, side="left"))


def _uniform_times(start_s: float, end_s: float, n: int) -> list[float]:
    """Centres of ``n`` equal segments of the span: never the very end, which may hold no frame."""
    step = (end_s - start_s) / n
    return [start_s + (i + 0.5) * step for i in range(n)]


def iter_frames(
    path: PathLike,
    start_s: float = 0.0,
    end_s: float | None = None,
    fps: float | None = None,
    num_frames: int | None = None,
    size: tuple[int, int] | None = None,
    short_side: int | None = None,
) -> Iterator[Frame]:
    """Stream upright RGB frames of ``[start_s, end_s)``.

    * neither ``fps`` nor ``num_frames``: every frame of the span;
    * ``fps=N``: the frame nearest to each of ``start_s + k / N``; a source frame is yielded at most once,
      so a target rate above the source rate gives every frame;
    * ``num_frames=N``: the frame nearest to each of N uniformly spaced times (segment centres); exactly N
      frames whenever the span holds a frame (a very short span repeats frames).

    ``size=(w, h)`` or ``short_side`` resizes inside the decoder's pixel-format conversion. The reader seeks
    to the keyframe before ``start_s`` and decodes forward; it stops once past ``end_s``. A truncated file
    yields the frames it has (``probe`` is where truncation is reported); failing libav calls raise
    :class:`VideoProbeError`.
    """
    if fps is not None and num_frames is not None:
        raise ValueError("pass fps or num_frames, not both")
    if size is not None and short_side is not None:
        raise ValueError("pass size or short_side, not both")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if start_s < 0 or (end_s is not None and end_s <= start_s):
        raise ValueError(f"invalid span start_s={start_s} end_s={end_s}: need 0 <= start_s < end_s")
    if size is not None and (int(size[0]) < 1 or int(size[1]) < 1):
        raise ValueError(f"size must be (width, height) with positive values, got {size}")
    if short_side is not None and short_side < 1:
        raise ValueError(f"short_side must be >= 1, got {short_side}")

    container, stream = _open_video(path)
    try:
        yield from _iter_open(container, stream, path, float(start_s), end_s, fps, num_frames, size, short_side)
    finally:
        container.close()


def _decoded(container: Any, stream: Any, path: PathLike) -> Iterator[Any]:
    """``container.decode(stream)``, with libav failures turned into a VideoProbeError naming the time."""
    import av

    last_t = 0.0
    it = container.decode(stream)
    while True:
        try:
            frame = next(it)
        except StopIteration:
            return
        except av.FFmpegError as exc:
            raise VideoProbeError(f"decoding failed after {last_t:.2f}s ({exc}); the file is damaged, "
                                  "re-encode it or fetch it again", path) from exc
        if frame.time is not None:
            last_t = float(frame.time)
        yield frame


def _seek_and_decode(container: Any, stream: Any, path: PathLike, t0: int, start_s: float,
                     eps: float) -> Iterator[Any]:
    """Decoded frames from the keyframe at or before ``start_s``.

    Some demuxers (MPEG-TS, files with sparse indexes) land on a keyframe after the target; then seek again
    further back, doubling the margin, until the first decoded frame is not after ``start_s``.
    """
    tb = stream.time_base
    margin = 0.0
    while True:
        target = max(0.0, start_s - margin)
        container.seek(t0 + int(target / tb), stream=stream, backward=True, any_frame=False)
        frames = _decoded(container, stream, path)
        first = next(frames, None)
        if first is None and target > 0:
            margin = max(1.0, 2 * margin)
            continue
        if first is None:
            return
        if target == 0.0 or first.pts is None or float((first.pts - t0) * tb) <= start_s + eps:
            yield first
            yield from frames
            return
        margin = max(1.0, 2 * margin)


def _iter_open(container: Any, stream: Any, path: PathLike, start_s: float, end_s: float | None,
               fps: float | None, num_frames: int | None, size: tuple[int, int] | None,
               short_side: int | None) -> Iterator[Frame]:
    stream.thread_type = "AUTO"  # frame + slice threads; decoding dominates the cost
    tb = stream.time_base
    t0 = stream.start_time if stream.start_time is not None else 0
    avg = stream.average_rate or stream.guessed_rate or stream.base_rate
    rate = float(avg) if avg else 0.0
    cfr = bool(avg) and stream.base_rate is not None and abs(float(stream.base_rate) - rate) < 1e-6
    sar = float(stream.sample_aspect_ratio) if stream.sample_aspect_ratio else 1.0

    span_end = end_s
    if (num_frames is not None or fps is not None) and span_end is None:
        # mp4 muxers may under-report a VFR stream's duration; take the longer of stream and container.
        known = [float(stream.duration * tb)] if stream.duration is not None else []
        if container.duration is not None:
            known.append(container.duration / 1_000_000)
        if known:
            span_end = max(known)
        elif num_frames is not None:
            raise VideoProbeError("the container declares no duration; pass end_s to sample num_frames", path)
        if span_end is not None and span_end <= start_s:
            return
    # 1 ms of slack (at most a quarter frame): span boundaries computed as index / fps in floating point
    # must keep their boundary frame, and never reach a neighbouring one.
    eps = min(1e-3, 0.25 / rate) if rate > 0 else 1e-3

    seeked = start_s > 0
    if seeked:
        frames = _seek_and_decode(container, stream, path, t0, start_s, eps)
    else:
        frames = _decoded(container, stream, path)

    targets: Iterator[float] | None
    if num_frames is not None:
        targets = iter(_uniform_times(start_s, float(span_end), num_frames))
    elif fps is not None:
        targets = (start_s + k / fps for k in _count())
    else:
        targets = None
    allow_repeat = num_frames is not None

    convert_cache: dict = {}

    def to_frame(av_frame, index: int, t: float) -> Frame:
        return Frame(index, t, _to_rgb(av_frame, size, short_side, sar, convert_cache))

    next_index: int | None = None if seeked else 0
    prev = None  # (av_frame, index, t) of the last in-span frame, for nearest-frame choice
    last_emitted = -1
    target = next(targets, None) if targets is not None else None

    for av_frame in frames:
        if av_frame.pts is None:
            continue  # no timestamp: cannot place it in time (rare, broken streams)
        t = float((av_frame.pts - t0) * tb)
        if next_index is None:  # first frame after a seek: establish its index in the source
            next_index = int(round(t * rate)) if cfr else _count_frames_before(path, stream.index, av_frame.pts)
        index = next_index
        next_index += 1
        if t < start_s - eps:
            continue
        if end_s is not None and t >= end_s - eps:
            break
        if targets is None:
            yield to_frame(av_frame, index, t)
            continue
        # Targets at or before t: the nearer of prev and this frame is the one to show.
        while target is not None and target <= t:
            if end_s is not None and target >= end_s:
                target = None
                break
            use_prev = prev is not None and (target - prev[2]) <= (t - target)
            chosen = prev if use_prev else (av_frame, index, t)
            if allow_repeat or chosen[1] != last_emitted:
                yield to_frame(*chosen)
                last_emitted = chosen[1]
            target = next(targets, None)
        if target is None:
            return
        prev = (av_frame, index, t)

    # Past the span or the end of the stream: the last in-span frame is the nearest to what is left.
    if targets is None or prev is None:
        return
    limit = end_s if end_s is not None else span_end
    while target is not None and (limit is None or target < limit):
        if allow_repeat or prev[1] != last_emitted:
            yield to_frame(*prev)
            last_emitted = prev[1]
        if not allow_repeat:
            break
        target = next(targets, None)


def _count() -> Iterator[int]:
    k = 0
    while True:
        yield k
        k += 1


def _to_rgb(av_frame: Any, size: tuple[int, int] | None, short_side: int | None, sar: float,
            cache: dict) -> np.ndarray:
    """Convert (and resize, in swscale) to upright RGB24."""
    rotation = _normalise_rotation(av_frame.rotation or 0)
    key = (av_frame.width, av_frame.height, rotation)
    dims = cache.get(key)
    if dims is None:
        disp_w, disp_h = _display_size(av_frame.width, av_frame.height, sar, rotation)
        out_w, out_h = _output_size(disp_w, disp_h, size, short_side)
        dims = (out_h, out_w) if rotation in (90, 270) else (out_w, out_h)  # size before rotating
        cache[key] = dims
    dec_w, dec_h = dims
    if (dec_w, dec_h) == (av_frame.width, av_frame.height):
        arr = av_frame.to_ndarray(format="rgb24")
    else:
        arr = av_frame.to_ndarray(format="rgb24", width=dec_w, height=dec_h, interpolation="BILINEAR")
    if rotation:
        # Display matrix rotation is counter-clockwise, as is np.rot90.
        arr = np.ascontiguousarray(np.rot90(arr, k=rotation // 90))
    return arr


def read_frames(
    path: PathLike,
    start_s: float = 0.0,
    end_s: float | None = None,
    fps: float | None = None,
    num_frames: int | None = None,
    size: tuple[int, int] | None = None,
    short_side: int | None = None,
) -> list[Frame]:
    """``list(iter_frames(...))``: for short spans or sparse sampling only; it holds every frame."""
    return list(iter_frames(path, start_s, end_s, fps=fps, num_frames=num_frames, size=size, short_side=short_side))


def first_frame(path: PathLike, start_s: float = 0.0, size: tuple[int, int] | None = None) -> np.ndarray:
    """The first frame at or after ``start_s`` as an upright HxWx3 uint8 RGB array."""
    for frame in iter_frames(path, start_s=start_s, size=size):
        return frame.image
    raise VideoProbeError(f"no frame at or after {start_s:.3f}s; the span starts past the end of the video", path)


__all__: Sequence[str] = [
    "Frame", "VideoProbe", "VideoProbeError", "first_frame", "iter_frames", "probe", "read_frames",
]
