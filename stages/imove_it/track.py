"""track: one SAMURAI trajectory per instance (iMOVE 3.1.1 Step-3: Instance Motion Trajectory Creation).

Each kept instance box from ``detect`` is a tracking target. All instances of a clip go into one tracker
call (SAMURAI keeps a Kalman state and a memory bank per object), with frames streamed from the video at
``fps`` over the clip span, so memory does not grow with clip length. The first streamed frame is the
frame the boxes were detected on. Boxes come back in pixels of the decoded frame; ``points[].t_s`` and
``points[].frame_index`` are on the source video's clock and frame numbering.

A clip whose tracking fails (unreadable video, tracker error) gives one error row per instance.
"""
from __future__ import annotations

import collections
import itertools
from typing import Any, Callable, Iterable, Iterator, Sequence

from pydantic import Field, field_validator

from experts.samurai import SamuraiSpec
from schemas._base import STATUS_ERROR
from schemas.instances import Instance
from schemas.tracks import SCHEMA, Track
from stages.base import Resources, ShardContext, Stage, StageConfig

TRACKER_EXPERT = "track.tracker"


class TrackConfig(StageConfig):
    # SAMURAI on SAM 2.1 Hiera-L with the reference release's motion settings (the SamuraiSpec defaults).
    tracker: SamuraiSpec = Field(default_factory=lambda: SamuraiSpec(model_id="facebook/sam2.1-hiera-large"))
    fps: float | None = 10.0  # frames per second fed to the tracker; None: every decoded frame
    short_side: int | None = None  # decode at this short side (boxes are mapped back to full-size pixels)
    max_frames: int | None = None  # stop after this many tracked frames per clip (None: the whole span)
    # Throughput only (left out of the config hash): frames decoded ahead of the tracker on a prefetch thread,
    # running on into the next clip while the tracker finishes this one (0: decode inline). Memory: this many
    # decoded frames beyond the tracker's own.
    prefetch_frames: int = Field(32, ge=0)

    RUN_ONLY_FIELDS = frozenset({"prefetch_frames"})

    @field_validator("fps")
    @classmethod
    def _fps(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"fps must be > 0 or None, got {v}")
        return v

    @field_validator("short_side", "max_frames")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1 or None, got {v}")
        return v


PROFILES = {
    "small": {"tracker": {"model_id": "facebook/sam2.1-hiera-tiny"}},
    "tiny": {"tracker": {"model_id": "tiny://sam2"}, "fps": 4.0, "short_side": 128, "max_frames": 6},
}


# -- pure functions ------------------------------------------------------------------------------------------
def group_by_clip(instances: Iterable[Instance]) -> list[list[Instance]]:
    groups: dict[str, list[Instance]] = collections.defaultdict(list)
    for inst in instances:
        groups[inst.clip_id].append(inst)
    return [sorted(g, key=lambda i: i.instance_id) for _, g in sorted(groups.items())]


def scale_box(box: Sequence[float] | None, s: float) -> list[float] | None:
    return None if box is None else [float(v) * s for v in box]


class _Recorder:
    """Passes frames through to the tracker and remembers each one's source index and time."""

    def __init__(self, frames: Iterable[Any], max_frames: int | None) -> None:
        self.frames = frames
        self.max_frames = max_frames
        self.index: list[int] = []
        self.t_s: list[float] = []
        self.size: tuple[int, int] | None = None  # (width, height) of the decoded frames

    def __iter__(self) -> Iterator[Any]:
        for frame in self.frames:
            if self.max_frames is not None and len(self.index) >= self.max_frames:
                return
            self.index.append(int(frame.index))
            self.t_s.append(float(frame.t_s))
            if self.size is None:
                self.size = (int(frame.image.shape[1]), int(frame.image.shape[0]))
            yield frame


def track_rows(instances: Sequence[Instance], points: Sequence[Any], rec: _Recorder, scale: float,
               track_fps: float | None) -> list[Track]:
    """Tracker output for one clip -> one Track per instance (points in time order, full-size pixels)."""
    per: dict[str, list[dict]] = {i.instance_id: [] for i in instances}
    for p in points:
        if p.instance_id not in per:
            raise RuntimeError(f"tracker returned instance {p.instance_id!r} that was not prompted")
        pos = int(p.frame_index)
        if not 0 <= pos < len(rec.index):
            raise RuntimeError(f"tracker returned frame {pos} but only {len(rec.index)} frames were streamed")
        per[p.instance_id].append({
            "t_s": rec.t_s[pos], "frame_index": rec.index[pos], "box_xyxy_px": scale_box(p.box_xyxy_px, scale),
            "visible": bool(p.visible), "mask_area_px": int(round(p.mask_area_px * scale * scale)),
            "object_score": float(p.object_score), "kf_score": None if p.kf_score is None else float(p.kf_score),
        })
    rows = []
    for inst in instances:
        pts = sorted(per[inst.instance_id], key=lambda d: (d["t_s"], d["frame_index"]))
        rows.append(Track(
            instance_id=inst.instance_id, clip_id=inst.clip_id, video_id=inst.video_id, video_path=inst.video_path,
            label=inst.label or "", start_s=inst.start_s, end_s=inst.end_s, duration_s=inst.duration_s,
            width=inst.width, height=inst.height, first_box_xyxy_px=list(inst.box_xyxy_px), track_fps=track_fps,
            num_frames=len(pts), num_visible=sum(1 for d in pts if d["visible"]), points=pts,
        ))
    return rows


def error_rows(instances: Sequence[Instance], message: str, track_fps: float | None) -> list[Track]:
    return [Track(instance_id=i.instance_id, clip_id=i.clip_id, video_id=i.video_id, video_path=i.video_path,
                  label=i.label or "", start_s=i.start_s, end_s=i.end_s, duration_s=i.duration_s, width=i.width,
                  height=i.height, first_box_xyxy_px=list(i.box_xyxy_px), track_fps=track_fps, num_frames=0,
                  num_visible=0, points=[], status=STATUS_ERROR, error=message) for i in instances]


def stream_clip(video_path: str, start_s: float, end_s: float, cfg: TrackConfig) -> Iterator[Any]:
    from experts.video import iter_frames

    return iter_frames(video_path, start_s=start_s, end_s=end_s, fps=cfg.fps, short_side=cfg.short_side)


def track_clip(instances: Sequence[Instance], tracker: Any, cfg: TrackConfig,
               frames: Callable[[str, float, float, TrackConfig], Iterable[Any]] = stream_clip) -> list[Track]:
    """Track every instance of one clip in one tracker call; failures of this clip become error rows."""
    from experts.video import VideoProbeError

    first = instances[0]
    if first.width is None or first.height is None or first.box_xyxy_px is None:
        return error_rows(instances, f"clip {first.clip_id}: detect rows carry no frame size or box; re-run detect",
                          cfg.fps)
    rec = None
    try:
        stream = iter(frames(first.video_path, first.start_s, first.end_s, cfg))
        head = next(stream, None)
        if head is None:
            return error_rows(instances, f"clip {first.clip_id}: no frame decoded in [{first.start_s:.3f}, "
                                         f"{first.end_s:.3f}) s of {first.video_path}", cfg.fps)
        if first.frame_t_s is not None and abs(float(head.t_s) - first.frame_t_s) > 1e-3:
            return error_rows(instances, (
                f"clip {first.clip_id}: the first tracked frame is at {float(head.t_s):.3f} s but the boxes were "
                f"detected at {first.frame_t_s:.3f} s; the prompts would be on the wrong frame"), cfg.fps)
        # Decoded pixels -> detect-frame pixels (1.0 unless short_side shrinks the frames).
        scale = first.width / int(head.image.shape[1])
        prompts = [(i.instance_id, scale_box(i.box_xyxy_px, 1.0 / scale)) for i in instances]
        rec = _Recorder(itertools.chain([head], stream), cfg.max_frames)
        points = tracker.track(rec, prompts)
    except VideoProbeError as exc:
        return error_rows(instances, f"clip {first.clip_id}: cannot decode {first.video_path}: {exc.reason}", cfg.fps)
    except (OSError, ValueError, RuntimeError) as exc:
        if type(exc).__name__ == "OutOfMemoryError":
            raise  # not this clip's fault: the whole shard is retried (maybe with a smaller short_side)
        done = len(rec.index) if rec is not None else 0
        return error_rows(instances, f"clip {first.clip_id}: tracking failed after {done} frames: "
                                     f"{type(exc).__name__}: {exc}", cfg.fps)
    return track_rows(instances, points, rec, scale, cfg.fps)


# -- the stage -----------------------------------------------------------------------------------------------
def load_samurai(cfg: TrackConfig):
    from experts.base import get_expert
    from experts.samurai import load_tracker

    return get_expert(cfg.tracker, load_tracker)


def process(ctx: ShardContext) -> list[Track]:
    cfg: TrackConfig = ctx.config
    groups = group_by_clip(ctx.read_records("detect", Instance))
    if not groups:
        return []
    tracker = ctx.expert(TRACKER_EXPERT, lambda: load_samurai(cfg))
    return track_clips(groups, tracker, cfg, progress=ctx.progress)


def track_clips(groups: Sequence[Sequence[Instance]], tracker: Any, cfg: TrackConfig,
                frames: Callable[[str, float, float, TrackConfig], Iterable[Any]] = stream_clip,
                progress=lambda done, total: None) -> list[Track]:
    """:func:`track_clip` for each clip's instances in turn, with the frames decoded on a prefetch thread up to
    ``prefetch_frames`` ahead of the tracker, across clip boundaries (SAMURAI's memory bank makes tracking
    sequential within a clip, so the overlap is decode with the model, not clips with each other). A decode
    failure surfaces inside that clip's stream, where :func:`track_clip` turns it into the clip's error rows."""
    from stages.shared.prefetch import prefetched_streams

    def open_stream(group: Sequence[Instance]) -> Iterable[Any]:
        first = group[0]
        return frames(first.video_path, first.start_s, first.end_s, cfg)

    rows: list[Track] = []
    streams = prefetched_streams(groups, open_stream, depth=cfg.prefetch_frames, limit=cfg.max_frames)
    for n, (group, stream) in enumerate(streams):
        rows.extend(track_clip(group, tracker, cfg, frames=lambda *_, s=stream: s))
        progress(n + 1, len(groups))
    return rows


def _expert(cfg: TrackConfig) -> tuple[str, str | None]:
    return f"samurai:{cfg.tracker.model_id}", cfg.tracker.revision


STAGE = Stage(
    name="track", schema=SCHEMA, inputs=("detect",), config_cls=TrackConfig, process=process, expert=_expert,
    resources=Resources(cpus=1, gpus=1), branch="imove_it",
    description="SAMURAI trajectory of every detected instance over its clip",
)
