"""``scenes``: shot cuts with PySceneDetect, then event-level clip spans (Panda-70M style).

Pure functions over plain values; the stage framework (``stages.base``) wires them to tables:

* :func:`detect_cuts` -- one video -> :class:`CutResult` (first frame of every new scene).
* :func:`detect_many` -- many videos over a process pool, failures returned per video; a single video is
  split into equal segments (:func:`detect_cuts_split`: segments scored in parallel, their seams checked
  pixel for pixel, the library's detector then
  decides over the stitched scores, so the cuts are the single pass's).
* :func:`clip_spans` -- a :class:`CutResult` -> :class:`ClipSpan` rows (short scenes kept as dropped rows,
  over-long scenes split into near-equal parts).
* :func:`clip_id` -- deterministic ``uuid5(video_id, start_s, end_s)`` (ARCHITECTURE rule 2).
* :func:`keyframe_times` / :func:`cut_clip` -- the optional cut step with ffmpeg.

Detection runs the scenedetect library itself (its ``VideoStream`` backend, ``SceneManager`` and detector)
with the settings the ``scenedetect`` CLI uses for the same options, so the cut frames are identical to
``scenedetect -i X -b <backend> [-d N] detect-content -t T -m M`` (``ScenesConfig.cli_args``; checked in
tests/test_scenes.py and benchmarks/bench_scenes.py). Speed comes from detecting at reduced resolution
(the SceneManager downscale, auto = about 256 px wide like the CLI), from no per-video interpreter
start, from an exact but cheaper frame-difference function, and from one worker process per core across
videos (or across equal segments of one long video), each decoding on one thread (FFmpeg's frame threads on
top of a process per core only add CPU; decoded pixels do not depend on the thread count). Converting
frames to a reduced size before colour conversion (YUV planes resized, then swscale) changes pixel values,
so borderline cuts could differ from the CLI; a prototype of it also cost more CPU per frame than the exact
path, so it is not offered.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import functools
import logging
import math
import multiprocessing
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Literal, Sequence

from pydantic import ConfigDict, Field, model_validator

from stages.base import StageConfig

Backend = Literal["pyav", "opencv"]
Detector = Literal["content", "adaptive"]
PyAVThreading = Literal["auto", "frame", "slice", "none"]

# Namespace for clip ids; any fixed UUID works, it only has to never change.
CLIP_ID_NAMESPACE = uuid.UUID("6f1d3c2e-7a4b-5c8d-9e0f-1a2b3c4d5e6f")


class SceneDetectionError(RuntimeError):
    """Scene detection failed on one video (unreadable file, no frames, unknown frame rate...)."""


class ClipCutError(RuntimeError):
    """ffmpeg could not write a clip."""


class ScenesConfig(StageConfig):
    """Settings of the ``scenes`` stage.

    Detector settings mirror the ``scenedetect`` CLI options of the same name, so
    ``scenedetect -i X -b {backend} [-d {downscale}] detect-content -t {threshold} -m {min_scene_len_frames}``
    (or ``detect-adaptive -t {adaptive_threshold}``) reproduces :func:`detect_cuts`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    detector: Detector = "content"
    # Panda-70M splits with ContentDetector at a threshold of about 25-27 (ARCHITECTURE.md).
    threshold: float = Field(27.0, ge=0.0, le=255.0)
    adaptive_threshold: float = Field(3.0, ge=0.0, le=255.0)
    # AdaptiveDetector's other knobs, at the library/CLI defaults.
    adaptive_window_frames: int = Field(2, ge=1)
    adaptive_min_content_val: float = Field(15.0, ge=0.0, le=255.0)
    # Panda-70M: minimum scene length 15 frames (a cut cannot follow another within 15 frames).
    min_scene_len_frames: int = Field(15, ge=0)
    min_clip_s: float = Field(2.0, ge=0.0)
    max_clip_s: float = Field(60.0, gt=0.0)
    # PySceneDetect's integer downscale factor (1 = full resolution), or "auto" (CLI default: the
    # largest frame side is brought to about 256 px).
    downscale: int | Literal["auto"] = "auto"
    # The CLI's default backend; here about 1.5x the frames/s of PyAV, whose bgr24 conversion is slower.
    backend: Backend = "opencv"
    # PyAV decoder threading, as the CLI's [backend-pyav] threading-mode (default auto). Does not change
    # decoded pixels, only speed.
    pyav_threading: PyAVThreading = "auto"
    # Optional cut step: write one file per kept clip.
    cut: bool = False
    reencode_crf: int = Field(18, ge=0, le=51)
    reencode_preset: str = "veryfast"
    # A clip start within this distance of a keyframe is stream-copied from that keyframe.
    keyframe_tolerance_s: float = Field(0.001, ge=0.0)
    # Worker processes for detection within one shard (keeps both cores busy across videos).
    workers: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _check_ranges(self) -> "ScenesConfig":
        if self.min_clip_s >= self.max_clip_s:
            raise ValueError(
                f"min_clip_s={self.min_clip_s} must be below max_clip_s={self.max_clip_s}; "
                "lower min_clip_s or raise max_clip_s"
            )
        if isinstance(self.downscale, int) and self.downscale < 1:
            raise ValueError(f"downscale={self.downscale} must be an integer >= 1 or 'auto'")
        return self

    def cli_args(self, video_path: str | os.PathLike) -> list[str]:
        """Arguments (after the executable) of the ``scenedetect`` CLI run equivalent to :func:`detect_cuts`.

        Used by tests and the benchmark to compare against the reference tool; ends with the detector
        command, so callers append an output command such as ``list-scenes``.
        """
        args = ["-i", os.fspath(video_path), "-b", self.backend]
        if self.downscale != "auto":
            args += ["-d", str(self.downscale)]
        if self.detector == "content":
            args += ["detect-content", "-t", str(self.threshold)]
        else:
            args += [
                "detect-adaptive",
                "-t", str(self.adaptive_threshold),
                "-f", str(self.adaptive_window_frames),
                "-c", str(self.adaptive_min_content_val),
            ]
        args += ["-m", str(self.min_scene_len_frames)]
        return args


@dataclasses.dataclass(frozen=True)
class CutResult:
    """Shot cuts of one video. Frame ``f`` starts at ``f / fps`` seconds from the first frame."""

    cut_frames: list[int]  # first frame of each new scene (0-based), ascending; frame 0 never listed
    num_frames: int  # frames decoded
    fps: float
    duration_s: float  # num_frames / fps: the end of the last frame


@dataclasses.dataclass(frozen=True)
class ClipSpan:
    """One candidate clip: a whole scene, or one part of an over-long scene."""

    start_frame: int
    end_frame: int  # exclusive
    start_s: float
    end_s: float
    scene_index: int  # 0-based index of the scene in the video (dropped scenes included)
    part_index: int  # 0-based part of the scene; > 0 only when a scene was split at max_clip_s
    kept: bool
    drop_reason: str | None

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


# --------------------------------------------------------------------------------------------- detect


def _l1_mean_distance(left, right) -> float:
    """Mean absolute difference of two 8-bit single-channel images, bit-identical to scenedetect's
    ``content_detector._mean_pixel_distance``: both divide the exact integer sum of |left - right| by the
    pixel count (cv2.norm accumulates integers in a double, exact below 2**53). Its numpy version
    allocates two int32 copies per channel per frame: swapping it saved about 15% of the CPU per frame.
    """
    import cv2

    return cv2.norm(left, right, cv2.NORM_L1) / float(left.shape[0] * left.shape[1])


def _use_fast_pixel_distance() -> None:
    # ContentDetector (and AdaptiveDetector, its subclass) look the function up as a module global.
    # Swapping it changes no score (tests compare every cut with the CLI, which runs unpatched).
    from scenedetect.detectors import content_detector

    if getattr(content_detector, "_mean_pixel_distance", None) is not None:
        content_detector._mean_pixel_distance = _l1_mean_distance


def _quiet_scenedetect_progress() -> None:
    # scenedetect sets its logger to INFO at import, and SceneManager.detect_scenes logs "Detecting scenes..." at
    # INFO on every call: under a flow run, one console line per video that says nothing (the task's outcome line
    # follows it). Warnings and errors still show; a level other than INFO that someone set is left alone.
    logger = logging.getLogger("pyscenedetect")
    if logger.level == logging.INFO:
        logger.setLevel(logging.WARNING)


def _open_stream(video_path: str, config: ScenesConfig):
    """The scenedetect backend the CLI would use; opened directly so a failure is never silently
    replaced by another backend (``scenedetect.open_video`` falls back to OpenCV)."""
    if config.backend == "pyav":
        from scenedetect.backends.pyav import VideoStreamAv

        threading_mode = None if config.pyav_threading == "none" else config.pyav_threading.upper()
        return VideoStreamAv(video_path, threading_mode=threading_mode, suppress_output=False)
    from scenedetect.backends.opencv import VideoStreamCv2

    if _DECODER_THREADS is None:
        return VideoStreamCv2(video_path)
    return _cv2_stream_with_threads(VideoStreamCv2, _DECODER_THREADS)(video_path)


# Decoder threads per capture inside pool workers (set by _worker_init); None = the backend's default (OpenCV:
# one per core). A pool already runs one process per core, and FFmpeg's frame threads on top cost about a fifth
# more CPU per frame (measured: 1.10 vs 1.33 CPU-s to read 3,000 640x360 H.264 frames, 2 cores) for no gain.
# H.264/HEVC decoding is bit-exact whatever the thread count, so cuts do not change.
_DECODER_THREADS: int | None = None


@functools.lru_cache(maxsize=None)
def _cv2_stream_with_threads(base: type, threads: int) -> type:
    """The library's OpenCV stream whose capture decodes on ``threads`` threads: the library opens the file
    (all its checks and error messages unchanged), then the capture is re-opened with
    ``CAP_PROP_N_THREADS``, which OpenCV takes only at open time."""
    import cv2

    class _Stream(base):  # type: ignore[misc, valid-type]
        def _open_capture(self, frame_rate=None):
            super()._open_capture(frame_rate)
            if getattr(self, "_is_device", False) or self._cap.getBackendName() != "FFMPEG":
                return  # a device, an image sequence...: the library's capture as it opened it
            cap = cv2.VideoCapture(self._path_or_device, cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, threads])
            if not cap.isOpened():  # FFmpeg could not open it again: keep the library's capture
                return
            cap.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1.0)
            self._cap.release()
            self._cap = cap

    return _Stream


def _make_detector(config: ScenesConfig):
    from scenedetect import AdaptiveDetector, ContentDetector

    if config.detector == "content":
        return ContentDetector(threshold=config.threshold, min_scene_len=config.min_scene_len_frames)
    return AdaptiveDetector(
        adaptive_threshold=config.adaptive_threshold,
        min_scene_len=config.min_scene_len_frames,
        window_width=config.adaptive_window_frames,
        min_content_val=config.adaptive_min_content_val,
    )


def detect_cuts(video_path: str | os.PathLike, config: ScenesConfig | None = None) -> CutResult:
    """Detect shot cuts in one video with PySceneDetect at reduced resolution.

    Raises :class:`SceneDetectionError` when the file is missing, cannot be opened or yields no frames.
    """
    from scenedetect import SceneManager
    from scenedetect.video_stream import FrameRateUnavailable, VideoOpenFailure

    config = config or ScenesConfig()
    _use_fast_pixel_distance()
    _quiet_scenedetect_progress()
    path = os.fspath(video_path)
    if not os.path.isfile(path):
        raise SceneDetectionError(f"scene detection: video not found: {path}; check the videos table path")
    try:
        stream = _open_stream(path, config)
    except FrameRateUnavailable as exc:
        raise SceneDetectionError(
            f"scene detection: {path} has no usable frame rate; re-encode it to constant frame rate "
            "(ffmpeg -i IN -r 25 OUT) or drop it at ingest"
        ) from exc
    except (VideoOpenFailure, OSError, ValueError) as exc:
        other = "pyav" if config.backend == "opencv" else "opencv"
        raise SceneDetectionError(
            f"scene detection: cannot open {path} with the {config.backend} backend "
            f"({type(exc).__name__}: {str(exc).strip()}); check that it has a video stream "
            f"(ffprobe -show_streams) or try backend='{other}'"
        ) from exc

    manager = SceneManager()
    if config.downscale == "auto":
        manager.auto_downscale = True
    else:
        manager.auto_downscale = False
        manager.downscale = config.downscale
    manager.add_detector(_make_detector(config))
    manager.detect_scenes(video=stream)

    scenes = manager.get_scene_list(start_in_scene=True)
    if not scenes:
        raise SceneDetectionError(
            f"scene detection: no frames could be decoded from {path}; the file is empty or corrupt "
            "(check it with `ffmpeg -v error -i FILE -f null -`)"
        )
    fps = float(stream.frame_rate)
    cut_frames = [int(start.frame_num) for start, _ in scenes[1:]]
    num_frames = int(scenes[-1][1].frame_num)
    return CutResult(cut_frames=cut_frames, num_frames=num_frames, fps=fps, duration_s=num_frames / fps)


# ------------------------------------------------------------------ one long video over several processes


@dataclasses.dataclass
class _SegmentScores:
    """What a worker returns for frames ``[start_frame, end_frame)`` of one video."""

    positions: list  # FrameTimecode of every frame read, in order
    scores: list[float]  # ContentDetector frame score; scores[0] is 0.0 (no previous frame in the segment)
    first: object  # the first and last frames, downscaled as the SceneManager does, for the boundary scores
    last: object
    fps: float  # the backend's frame rate, as detect_cuts reports it
    # The first _EDGE frames of the segment, and the _EDGE frames decoded after its end (read on, not scored):
    # the stitch requires the next segment's seek to have landed on exactly those pixels.
    head: list = dataclasses.field(default_factory=list)
    after: list = dataclasses.field(default_factory=list)


_EDGE = 2  # frames compared across each segment boundary
SPLIT_MIN_SEGMENT_S = 5.0  # shorter videos are not split: one pass costs less than starting the segment workers


def _downscale_factor(stream, config: ScenesConfig) -> float:
    from scenedetect.scene_manager import compute_downscale_factor

    if config.downscale == "auto":
        return compute_downscale_factor(max(stream.frame_size))
    return float(config.downscale)


def _segment_scores(path: str, config: ScenesConfig, start_frame: int, end_frame: int | None) -> _SegmentScores:
    """Scores of one segment, computed exactly as ``SceneManager.detect_scenes`` would: same backend, same
    resize (``cv2.resize`` with the manager's default linear interpolation), the library's own
    ``ContentDetector._calculate_frame_score``."""
    import cv2

    _use_fast_pixel_distance()
    stream = _open_stream(path, config)
    factor = _downscale_factor(stream, config)
    if start_frame > 0:
        stream.seek(start_frame)
    det = _make_detector(config)
    positions, scores, first, last, head, after = [], [], None, None, [], []

    def small(frame):
        if factor > 1.0:
            return cv2.resize(frame, (max(1, round(frame.shape[1] / factor)), max(1, round(frame.shape[0] / factor))),
                              interpolation=cv2.INTER_LINEAR)
        return frame

    while end_frame is None or len(positions) < end_frame - start_frame:
        frame = stream.read()
        if frame is False:
            break
        frame = small(frame)
        pos = stream.position
        scores.append(det._calculate_frame_score(pos, frame))
        positions.append(pos)
        if first is None:
            first = frame
        if len(head) < _EDGE:
            head.append(frame)
        last = frame
    while end_frame is not None and len(after) < _EDGE:
        frame = stream.read()
        if frame is False:
            break
        after.append(small(frame))
    return _SegmentScores(positions, scores, first, last, float(stream.frame_rate), head, after)


def _segment_starts(path: str, config: ScenesConfig, segments: int) -> tuple[list[int], float]:
    """Where segments start (0 first): equal shares of the frame count from the container's header.

    Not only at keyframes: the backends seek frame-accurately (decoding on from the keyframe before), and a
    keyframe can sit far from the middle (one every ~6 s in common encodes), which left one worker with
    several per cent more frames than the other. Nor does it demux the whole file first to list keyframes.
    Whether each seek landed exactly is checked on the decoded pixels when the segments are stitched."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        frames = stream.frames
        duration = float(stream.duration * stream.time_base) if stream.duration else None
        if not duration and container.duration:
            duration = container.duration / 1_000_000
    if not fps > 0:
        return [0], 0.0
    total = frames or (round(duration * fps) if duration else 0)
    # a segment shorter than this costs more in worker start-up and seeking than it saves
    segments = min(segments, int(total // max(1.0, SPLIT_MIN_SEGMENT_S * fps)))
    starts = [0]
    for i in range(1, segments):
        cand = round(total * i / segments)
        if cand > starts[-1] and cand < total:
            starts.append(cand)
    return starts, fps


class _ScoredContentDetector:
    """Replays precomputed frame scores through the library's own ContentDetector decision (threshold and
    flash filter), so the cut decisions are the library's, only the scores were computed elsewhere."""

    def __init__(self, config: ScenesConfig, scores: dict[int, float]):
        det = _make_detector(config)
        det._calculate_frame_score = lambda timecode, frame_img: scores[timecode.frame_num]  # noqa: ARG005
        self.det = det


def detect_cuts_split(path: str | os.PathLike, config: ScenesConfig | None = None, workers: int = 2,
                      pool: cf.Executor | None = None) -> CutResult:
    """:func:`detect_cuts` for one long video over ``workers`` processes: the video is split into equal
    segments (each worker seeks to its start; the stitch checks that the seek landed on exactly the frames a
    sequential read decodes there), each segment's frame scores are computed in parallel, the scores across
    each boundary are computed from the neighbouring segments' edge frames, and the library's ContentDetector
    then decides the cuts over the whole score sequence in order. The cuts are those of the single pass (tests/test_scenes.py checks it on
    real footage and against the CLI). Other detectors, short videos and files whose segments do not join
    frame for frame fall back to the single pass."""

    config = config or ScenesConfig()
    path = os.fspath(path)
    if config.detector == "content" and workers > 1 and os.path.isfile(path):
        try:
            res = _split_detect(path, config, workers, pool)
        except Exception:  # noqa: BLE001 -- e.g. a damaged index: the single pass reports the real problem
            res = None
        if res is not None:
            return res
    return detect_cuts(path, config)


def _split_detect(path: str, config: ScenesConfig, workers: int, pool: cf.Executor | None) -> CutResult | None:
    """The split-and-stitch detection, or None when the video cannot be split exactly (then: single pass)."""
    from scenedetect.scene_manager import get_scenes_from_cuts

    starts, fps = _segment_starts(path, config, workers)
    if len(starts) < 2:
        return None
    bounds = list(zip(starts, starts[1:] + [None]))
    own = pool is None
    pool = pool or cf.ProcessPoolExecutor(max_workers=min(workers, len(bounds)), mp_context=_worker_context(),
                                          initializer=_worker_init)
    try:
        parts = list(pool.map(_segment_scores, [path] * len(bounds), [config] * len(bounds),
                              [a for a, _ in bounds], [b for _, b in bounds]))
    finally:
        if own:
            pool.shutdown()
    # every segment must continue its predecessor frame for frame, or the single pass decides: numbered on
    # from where the previous one ended, and its first frames the very pixels that reading on past the
    # previous segment's end decodes (a seek that landed a frame early or late, or on other pixels, fails this)
    for (a, b), part in zip(bounds, parts):
        nums = [p.frame_num for p in part.positions]
        if not nums or nums[0] != a or nums != list(range(a, a + len(nums))) or (b is not None and len(nums) != b - a):
            return None
    import numpy as np

    for prev, part in zip(parts, parts[1:]):
        n = min(_EDGE, len(part.head))
        if len(prev.after) < n or not all(np.array_equal(x, y) for x, y in zip(prev.after[:n], part.head[:n])):
            return None
    scores: dict[int, float] = {}
    for i, part in enumerate(parts):
        for pos, sc in zip(part.positions, part.scores):
            scores[pos.frame_num] = sc
        if i > 0:  # the boundary frame's score against the previous segment's last frame
            det = _make_detector(config)
            det._calculate_frame_score(parts[i - 1].positions[-1], parts[i - 1].last)
            scores[part.positions[0].frame_num] = det._calculate_frame_score(part.positions[0], part.first)
    det = _ScoredContentDetector(config, scores).det
    cuts: list = []
    positions = [p for part in parts for p in part.positions]
    for pos in positions:
        cuts += det.process_frame(pos, None)
    cuts += det.post_process(positions[-1])
    scenes = get_scenes_from_cuts(cut_list=sorted(set(cuts)), start_pos=positions[0], end_pos=positions[-1] + 1)
    cut_frames = [int(start.frame_num) for start, _ in sorted(scenes)[1:]]
    num_frames = int(sorted(scenes)[-1][1].frame_num)
    rate = parts[0].fps
    return CutResult(cut_frames=cut_frames, num_frames=num_frames, fps=rate, duration_s=num_frames / rate)


def _detect_or_error(path: str, config: ScenesConfig) -> CutResult | SceneDetectionError:
    # Exceptions are returned, not raised, and re-wrapped as plain SceneDetectionError so they always
    # pickle back from a worker process (some library exceptions do not).
    try:
        return detect_cuts(path, config)
    except SceneDetectionError as exc:
        return SceneDetectionError(str(exc))
    except Exception as exc:  # noqa: BLE001 -- one bad video must not fail the shard (rule 4)
        return SceneDetectionError(f"scene detection failed on {path}: {type(exc).__name__}: {exc}")


def _detect_split_or_error(path: str, config: ScenesConfig, workers: int) -> CutResult | SceneDetectionError:
    try:
        return detect_cuts_split(path, config, workers)
    except SceneDetectionError as exc:
        return SceneDetectionError(str(exc))
    except Exception as exc:  # noqa: BLE001 -- one bad video must not fail the shard (rule 4)
        return SceneDetectionError(f"scene detection failed on {path}: {type(exc).__name__}: {exc}")


def _worker_init() -> None:
    # One process per core already; OpenCV's own thread pool and FFmpeg's decoder threads would only
    # oversubscribe the cores. Thread counts do not change decoded pixels or resize/colour results.
    import cv2

    global _DECODER_THREADS
    cv2.setNumThreads(1)
    _DECODER_THREADS = 1


def _worker_context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["cv2", "numpy", "scenedetect", "stages.scenes"])
    return ctx


def detect_many(
    paths: Sequence[str | os.PathLike],
    config: ScenesConfig | None = None,
    workers: int = 2,
) -> list[CutResult | Exception]:
    """:func:`detect_cuts` over many videos, one per worker process, results in input order.

    A video that fails gives its exception in its slot instead of raising. Videos are handed out
    largest file first so one long video does not run alone at the end. ``workers <= 1`` (or a single
    video) runs in this process.
    """
    config = config or ScenesConfig()
    paths = [os.fspath(p) for p in paths]
    if workers <= 1 or not paths:  # (no videos: a shard whose inputs were all errors or duplicates)
        return [_detect_or_error(p, config) for p in paths]
    if len(paths) == 1:  # one video: split it into segments so every worker has a part (same cuts)
        return [_detect_split_or_error(paths[0], config, workers)]

    def size(p: str) -> int:
        try:
            return os.path.getsize(p)
        except OSError:
            return 0

    order = sorted(range(len(paths)), key=lambda i: -size(paths[i]))
    results: list[CutResult | Exception | None] = [None] * len(paths)
    # Not plain fork: the caller may be a threaded Prefect/Ray worker, and forking threads can deadlock.
    # A forkserver is single-threaded; preloading the decoder libraries there means each worker starts
    # with them imported instead of paying ~0.5 s of imports per worker (as spawn does).
    ctx = _worker_context()
    with cf.ProcessPoolExecutor(
        max_workers=min(workers, len(paths)), mp_context=ctx, initializer=_worker_init
    ) as pool:
        futures = {pool.submit(_detect_or_error, paths[i], config): i for i in order}
        for fut in cf.as_completed(futures):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except Exception as exc:  # noqa: BLE001 -- e.g. a worker killed by the OOM killer
                results[i] = SceneDetectionError(
                    f"scene detection worker failed on {paths[i]}: {type(exc).__name__}: {exc}"
                )
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- spans


def _split_sizes(num_frames: int, max_frames: int) -> list[int]:
    """Near-equal part sizes (differing by at most one frame), each <= max_frames."""
    parts = math.ceil(num_frames / max_frames)
    base, extra = divmod(num_frames, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def clip_spans(cut: CutResult, config: ScenesConfig | None = None) -> list[ClipSpan]:
    """Turn shot cuts into clip spans, Panda-70M style.

    Every scene gives at least one row so the table explains itself: a scene shorter than
    ``min_clip_s`` is one row with ``kept=False`` and a reason; a scene longer than ``max_clip_s`` is split
    into the fewest near-equal parts (in frames) that are each at most ``max_clip_s`` long.
    """
    config = config or ScenesConfig()
    if not (cut.fps > 0 and math.isfinite(cut.fps)):
        raise ValueError(f"clip_spans: fps must be a positive number, got {cut.fps}")
    if cut.num_frames <= 0:
        return []
    bounds = [0, *cut.cut_frames, cut.num_frames]
    for a, b in zip(bounds, bounds[1:]):
        if not a < b:
            raise ValueError(
                f"clip_spans: cut_frames must be strictly increasing and inside (0, num_frames="
                f"{cut.num_frames}), got {cut.cut_frames}"
            )
    fps = cut.fps
    # Largest whole number of frames that fits in max_clip_s (the epsilon keeps 60.0 s * 25 fps at 1500).
    max_frames = max(1, math.floor(config.max_clip_s * fps + 1e-6))

    spans: list[ClipSpan] = []
    for scene_index, (start, end) in enumerate(zip(bounds, bounds[1:])):
        scene_s = (end - start) / fps
        if scene_s < config.min_clip_s:
            spans.append(
                ClipSpan(
                    start_frame=start,
                    end_frame=end,
                    start_s=start / fps,
                    end_s=end / fps,
                    scene_index=scene_index,
                    part_index=0,
                    kept=False,
                    drop_reason=f"scene shorter than min_clip_s={config.min_clip_s} ({scene_s:.2f} s)",
                )
            )
            continue
        sizes = _split_sizes(end - start, max_frames) if end - start > max_frames else [end - start]
        part_start = start
        for part_index, n in enumerate(sizes):
            part_end = part_start + n
            part_s = n / fps
            # Only reachable when max_clip_s < 2 * min_clip_s: a split part can fall below the minimum.
            short = part_s < config.min_clip_s
            spans.append(
                ClipSpan(
                    start_frame=part_start,
                    end_frame=part_end,
                    start_s=part_start / fps,
                    end_s=part_end / fps,
                    scene_index=scene_index,
                    part_index=part_index,
                    kept=not short,
                    drop_reason=(
                        f"part of a split scene shorter than min_clip_s={config.min_clip_s} ({part_s:.2f} s)"
                        if short
                        else None
                    ),
                )
            )
            part_start = part_end
    return spans


def clip_id(video_id: str, start_s: float, end_s: float) -> str:
    """Deterministic clip id: uuid5 over the video id and the span rounded to milliseconds."""
    start_ms = round(start_s * 1000)
    end_ms = round(end_s * 1000)
    return str(uuid.uuid5(CLIP_ID_NAMESPACE, f"{video_id}|{start_ms}|{end_ms}"))


# ------------------------------------------------------------------------------------------------ cut


def keyframe_times(video_path: str | os.PathLike) -> list[float]:
    """Presentation times (s, from the first frame) of the keyframes of the first video stream.

    Reads packets only (no decoding), so it costs about as much as reading the file.
    """
    import av

    path = os.fspath(video_path)
    try:
        container = av.open(path)
    except Exception as exc:  # av raises its own FFmpegError subclasses
        raise ClipCutError(f"cannot open {path} to list keyframes ({exc}); check the file with ffprobe") from exc
    with container:
        if not container.streams.video:
            raise ClipCutError(f"{path} has no video stream")
        stream = container.streams.video[0]
        start = stream.start_time or 0
        tb = stream.time_base
        times = sorted(
            float((pkt.pts - start) * tb)
            for pkt in container.demux(stream)
            if pkt.is_keyframe and pkt.pts is not None
        )
    return times


def _ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise ClipCutError("ffmpeg not found on PATH; install it (scripts/setup.sh does) to cut clips")
    return exe


def _copy_packet_count(src: str, key_s: float, end_s: float) -> int | None:
    """Packets a stream copy from the keyframe at ``key_s`` must take to hold exactly the frames shown in
    ``[key_s, end_s)``, or None when no stream copy can (then the caller re-encodes).

    ffmpeg's ``-t`` stops a stream copy on decode timestamps, so with B-frames a copy ends up to the
    reorder delay past ``end_s`` (frames of the next scene). Counting packets instead is exact when the
    wanted frames are a prefix of the decode order from the keyframe; that holds when the end is a
    keyframe or the end of the stream, or when no B-frame straddles the end. It fails for open-GOP
    leading frames or a B-frame shown before ``end_s`` that references a frame after it.
    """
    import av

    with av.open(src) as container:
        stream = container.streams.video[0]
        tb = stream.time_base
        origin = stream.start_time or 0
        key_pts = origin + round(key_s / tb)
        end_pts = origin + round(end_s / tb)
        container.seek(key_pts, stream=stream, backward=True, any_frame=False)
        count = 0
        beyond = False  # a packet shown at or after end_s was already seen
        first = True
        for pkt in container.demux(stream):
            if pkt.pts is None:
                if pkt.size == 0:  # flush packet at end of stream
                    break
                return None
            if first:
                if not pkt.is_keyframe or pkt.pts != key_pts:
                    return None
                first = False
            if pkt.pts < key_pts:
                return None  # open-GOP leading frame: needs the previous GOP
            if pkt.pts < end_pts:
                if beyond:
                    return None  # shown before end_s but decoded after a frame we must drop
                count += 1
            else:
                beyond = True
                # pts >= dts for every packet, so once decoding passes end_s nothing later is wanted
                if pkt.dts is not None and pkt.dts >= end_pts:
                    break
    return count or None


def cut_clip(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    start_s: float,
    end_s: float,
    keyframes_s: list[float] | None,
    *,
    crf: int = 18,
    preset: str = "veryfast",
    keyframe_tolerance_s: float = 0.001,
) -> str:
    """Write ``src[start_s:end_s]`` (video only) to ``dst`` with ffmpeg; returns ``"copy"`` or ``"reencode"``.

    A span that starts on a keyframe (within ``keyframe_tolerance_s``) is stream-copied: fast and
    lossless, exactly the frames shown in ``[start_s, end_s)``. Any other start would make a copy begin at
    the previous keyframe, so it is re-encoded with libx264 (``crf``, ``preset``) from the exact frame; so is
    the rare keyframe start whose end a copy cannot hit exactly (see :func:`_copy_packet_count`). ``keyframes_s`` are the source's keyframe
    times (:func:`keyframe_times`); ``None`` looks them up. The file is written under a temporary name
    and renamed, so a crash never leaves a partial clip under ``dst``.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if not end_s > start_s >= 0:
        raise ValueError(f"cut_clip: need 0 <= start_s < end_s, got start_s={start_s}, end_s={end_s}")
    if not os.path.isfile(src):
        raise ClipCutError(f"cut_clip: source video not found: {src}")
    if keyframes_s is None:
        keyframes_s = keyframe_times(src)
    on_key = [k for k in keyframes_s if abs(k - start_s) <= keyframe_tolerance_s]
    key = min(on_key, key=lambda k: abs(k - start_s)) if on_key else None
    packets = _copy_packet_count(src, key, end_s) if key is not None else None
    mode = "copy" if packets else "reencode"
    duration = end_s - start_s

    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    suffix = Path(dst).suffix or ".mp4"
    tmp = f"{dst}.part{suffix}"
    cmd = [_ffmpeg(), "-nostdin", "-v", "error", "-y"]
    if mode == "copy":
        # Input seeking with stream copy starts at the last keyframe <= -ss. Seek to the keyframe's own
        # time: ffmpeg rescales the microsecond value to the stream time base rounding to nearest, which
        # gives back the keyframe's exact pts (a value a hair below it would land on the keyframe before).
        cmd += ["-ss", f"{key:.6f}", "-i", src, "-map", "0:v:0", "-c", "copy",
                "-frames:v", str(packets)]
    else:
        cmd += ["-ss", f"{start_s:.6f}", "-i", src, "-t", f"{duration:.6f}", "-map", "0:v:0",
                "-c:v", "libx264", "-crf", str(crf), "-preset", preset, "-pix_fmt", "yuv420p"]
    cmd += ["-an", "-sn", "-dn", "-movflags", "+faststart", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(tmp) or os.path.getsize(tmp) == 0:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ClipCutError(
            f"ffmpeg failed to cut {src} [{start_s:.3f}, {end_s:.3f}] s ({mode}), exit {proc.returncode}: "
            f"{proc.stderr.strip()[-500:]}"
        )
    os.replace(tmp, dst)
    return mode


# -- stage wiring ---------------------------------------------------------------------------------------------
def _error_clip(video, reason: str):
    from schemas._base import STATUS_ERROR
    from schemas.clips import Clip

    return Clip(clip_id=clip_id(video.video_id, 0.0, 0.0), video_id=video.video_id, video_path=video.path,
                scene_index=-1, part_index=0, start_frame=0, end_frame=0, start_s=0.0, end_s=0.0, duration_s=0.0,
                fps=video.fps, width=video.width, height=video.height, status=STATUS_ERROR, error=reason)


def clips_for_video(video, cut: "CutResult", config: ScenesConfig) -> list:
    """Clip rows of one video: kept spans ``ok``, too-short scenes ``skipped`` with their reason."""
    from schemas._base import STATUS_SKIPPED
    from schemas.clips import Clip

    rows = []
    for sp in clip_spans(cut, config):
        rows.append(Clip(
            clip_id=clip_id(video.video_id, sp.start_s, sp.end_s), video_id=video.video_id, video_path=video.path,
            scene_index=sp.scene_index, part_index=sp.part_index, start_frame=sp.start_frame, end_frame=sp.end_frame,
            start_s=sp.start_s, end_s=sp.end_s, duration_s=sp.end_s - sp.start_s, fps=cut.fps, width=video.width,
            height=video.height, status="ok" if sp.kept else STATUS_SKIPPED, error=None if sp.kept else sp.drop_reason))
    return rows


def process(ctx) -> list:
    from schemas.videos import Video

    cfg: ScenesConfig = ctx.config
    videos = ctx.read_records("ingest", Video)
    if cfg.cut and not ctx.root.is_local:
        raise ValueError("scenes.cut=true needs a local output root (ffmpeg writes the clip files); "
                         "cut locally and sync, or leave cut off and read spans from the source videos")
    results = detect_many([v.path for v in videos], cfg, workers=cfg.workers)
    rows = []
    for i, (video, res) in enumerate(zip(videos, results)):
        if isinstance(res, Exception):
            rows.append(_error_clip(video, f"scene detection failed: {res}"))
            continue
        try:
            clips = clips_for_video(video, res, cfg)
        except ValueError as exc:
            rows.append(_error_clip(video, f"clip spans could not be made: {exc}"))
            continue
        if cfg.cut:
            clips = _cut_all(ctx, video, clips, cfg)
        rows += clips
        ctx.progress(i + 1, len(videos))
    return rows


def _cut_all(ctx, video, clips, cfg: ScenesConfig) -> list:
    import dataclasses

    from schemas._base import STATUS_ERROR

    out_dir = ctx.media_dir("clips", video.video_id)
    try:
        keyframes = keyframe_times(video.path)
    except Exception:  # noqa: BLE001 -- without keyframe times every clip is re-encoded, which is always correct
        keyframes = []
    done = []
    for c in clips:
        if c.status != "ok":
            done.append(c)
            continue
        dst = os.path.join(out_dir, f"{c.clip_id}.mp4")
        try:
            mode = cut_clip(video.path, dst, c.start_s, c.end_s, keyframes, crf=cfg.reencode_crf,
                            preset=cfg.reencode_preset, keyframe_tolerance_s=cfg.keyframe_tolerance_s)
            done.append(dataclasses.replace(c, clip_path=dst, cut_mode=mode))
        except ClipCutError as exc:
            done.append(dataclasses.replace(c, status=STATUS_ERROR, error=f"cutting the clip failed: {exc}"))
    return done


def _expert(cfg: ScenesConfig) -> tuple[str, str | None]:
    import scenedetect

    return (f"pyscenedetect:{cfg.detector}", scenedetect.__version__)


def _make_stage():
    from schemas.clips import SCHEMA
    from stages.base import Resources, Stage

    return Stage(name="scenes", schema=SCHEMA, inputs=("ingest",), config_cls=ScenesConfig, process=process,
                 expert=_expert, resources=Resources(cpus=2), description="PySceneDetect cuts -> event-level clip spans")


STAGE = _make_stage()

# Synthetic sample videos have 1-3 s shots; the tiny profile (smoke runs) keeps them.
PROFILES = {"tiny": {"min_clip_s": 1.0}}
