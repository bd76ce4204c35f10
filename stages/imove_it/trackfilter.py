"""trackfilter: keep or drop each trajectory (iMOVE 3.1.1 Step-3, the trajectory filter).

The paper drops "trajectories with bounding boxes that differ significantly in area from the initial
bounding boxes" (the tracker has most likely lost its target or grown onto the background) and those
"with low CLIP similarity scores between the bounding boxes and their corresponding category names".
Here:

* area drift: for every visible tracked box, ``a / a0`` where ``a0`` is the first visible tracked box
  (both are mask extents, so they are measured the same way); dropped if any ratio is outside
  ``[1 / max_area_ratio, max_area_ratio]``;
* visibility: dropped if the object is visible in less than ``min_visible_fraction`` of tracked frames
  (a track that is mostly "object absent" carries no motion);
* CLIP: ``clip_samples`` crops spread uniformly over the visible points, each scored against the
  category prompt with CLIP; dropped if their mean is below ``min_clip_score``.

One verdict row per trajectory with all metrics; every reason that applies is listed.
"""
from __future__ import annotations

import collections
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from pydantic import Field, field_validator

from experts.clip import ClipSpec
from schemas._base import STATUS_ERROR, STATUS_OK, STATUS_SKIPPED
from schemas.track_verdicts import SCHEMA, TrackVerdict
from schemas.tracks import Track
from stages.base import Resources, ShardContext, Stage, StageConfig
from stages.shared.geometry import box_area, crop_box

CLIP_EXPERT = "trackfilter.clip"


class TrackFilterConfig(StageConfig):
    max_area_ratio: float | None = 2.5  # any visible box area / first area outside [1/k, k] drops the track
    min_visible_fraction: float | None = 0.5
    clip: ClipSpec = Field(default_factory=ClipSpec)  # ViT-B/32 as in the paper
    clip_template: str = "a photo of a {label}."
    min_clip_score: float | None = 0.2  # on the mean over the sampled crops
    clip_samples: int = 8
    crop_padding: float = 0.0
    # Throughput only (left out of the config hash; verdicts agree up to float rounding of batched passes):
    # clips whose crops share one CLIP call, clips decoded ahead of the model (None: one batch; 0: inline),
    # and crops per CLIP forward pass.
    batch_size: int = Field(8, ge=1)
    prefetch_depth: int | None = Field(None, ge=0)
    clip_batch_size: int = Field(256, ge=1)

    RUN_ONLY_FIELDS = frozenset({"batch_size", "prefetch_depth", "clip_batch_size"})

    @field_validator("max_area_ratio")
    @classmethod
    def _ratio(cls, v: float | None) -> float | None:
        if v is not None and v < 1:
            raise ValueError(f"max_area_ratio is a factor >= 1 (areas within [1/k, k] pass), got {v}")
        return v

    @field_validator("clip_samples")
    @classmethod
    def _samples(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"clip_samples must be >= 1, got {v}")
        return v


PROFILES = {
    "small": {"clip": {"model_id": "openai", "arch": "ViT-B-32"}},
    # Random weights: tiny SAM 2 boxes mean nothing, so the area / visibility rules are off and CLIP is only run.
    "tiny": {"clip": {"model_id": "tiny://clip"}, "min_clip_score": -1.0, "max_area_ratio": None,
             "min_visible_fraction": None, "clip_samples": 3},
}


# -- pure functions ------------------------------------------------------------------------------------------
def area_metrics(points: Sequence[dict]) -> tuple[float | None, float | None, float | None, float]:
    """(max deviation factor >= 1, min a/a0, max a/a0, visible fraction) over the visible boxes."""
    n = len(points)
    vis = [p for p in points if p["visible"] and p["box_xyxy_px"] is not None]
    visible_fraction = len(vis) / n if n else 0.0
    areas = [box_area(p["box_xyxy_px"]) for p in vis]
    if not areas or areas[0] <= 0:
        return None, None, None, visible_fraction
    ratios = [a / areas[0] for a in areas]
    lo, hi = min(ratios), max(ratios)
    dev = math.inf if lo <= 0 else max(hi, 1.0 / lo)
    return dev, lo, hi, visible_fraction


def sample_points(points: Sequence[dict], n: int) -> list[dict]:
    """Up to ``n`` visible points spread uniformly over the visible ones (first and last included)."""
    vis = [p for p in points if p["visible"] and p["box_xyxy_px"] is not None]
    if len(vis) <= n:
        return vis
    picks = np.unique(np.round(np.linspace(0, len(vis) - 1, n)).astype(int))
    return [vis[i] for i in picks]


def verdict_reasons(cfg: TrackFilterConfig, dev: float | None, lo: float | None, hi: float | None,
                    visible_fraction: float, mean_clip: float | None, n_visible: int, label: str) -> list[str]:
    reasons = []
    if n_visible == 0:
        reasons.append("the object is never visible in the tracked frames")
    if cfg.max_area_ratio is not None and dev is not None and dev > cfg.max_area_ratio:
        grew = lo is not None and hi is not None and lo > 0 and hi >= 1.0 / lo
        which = f"grew to {hi:.2f}x" if grew else f"shrank to {lo:.2f}x"
        reasons.append(f"box area drifted: {which} the first box (limit {cfg.max_area_ratio:g}x either way)")
    if cfg.min_visible_fraction is not None and n_visible and visible_fraction < cfg.min_visible_fraction:
        reasons.append(f"visible in {visible_fraction:.0%} of tracked frames < {cfg.min_visible_fraction:.0%}")
    if cfg.min_clip_score is not None and mean_clip is not None and mean_clip < cfg.min_clip_score:
        reasons.append(f"mean CLIP score {mean_clip:.3f} < {cfg.min_clip_score:g} for {label!r}")
    return reasons


def judge(track: Track, samples: Sequence[dict], clip_scores: Sequence[float], cfg: TrackFilterConfig) -> TrackVerdict:
    dev, lo, hi, vf = area_metrics(track.points)
    n_visible = sum(1 for p in track.points if p["visible"] and p["box_xyxy_px"] is not None)
    mean_clip = float(np.mean(clip_scores)) if len(clip_scores) else None
    reasons = verdict_reasons(cfg, dev, lo, hi, vf, mean_clip, n_visible, track.label)
    reason = "; ".join(reasons) or None
    return TrackVerdict(
        instance_id=track.instance_id, clip_id=track.clip_id, video_id=track.video_id, label=track.label,
        kept=reason is None, reason=reason, max_area_ratio=None if dev is None or math.isinf(dev) else dev,
        area_ratio_min=lo, area_ratio_max=hi, visible_fraction=vf, mean_clip_score=mean_clip,
        clip_scores=[float(s) for s in clip_scores], clip_sample_t_s=[float(p["t_s"]) for p in samples],
        status=STATUS_OK if reason is None else STATUS_SKIPPED, error=reason,
    )


def error_verdict(track: Track, message: str) -> TrackVerdict:
    return TrackVerdict(instance_id=track.instance_id, clip_id=track.clip_id, video_id=track.video_id,
                        label=track.label, kept=False, reason=message, clip_scores=[], clip_sample_t_s=[],
                        status=STATUS_ERROR, error=message)


def stream_frames(video_path: str, start_s: float, end_s: float, track_fps: float | None) -> Iterable[Any]:
    """The clip's frames at the rate it was tracked (so the sampled points' frame indices come up)."""
    from experts.video import iter_frames

    return iter_frames(video_path, start_s=start_s, end_s=end_s, fps=track_fps)


def crops_along_tracks(frames: Iterable[Any], wanted: dict[int, list[tuple[str, dict]]],
                       padding: float) -> list[tuple[str, dict, np.ndarray]]:
    """Cut the crops of the sampled points while streaming, so only crops (never whole frames) are kept."""
    out: list[tuple[str, dict, np.ndarray]] = []
    last = max(wanted) if wanted else -1
    for frame in frames:
        for iid, p in wanted.get(int(frame.index), ()):
            crop = crop_box(frame.image, p["box_xyxy_px"], padding)
            if crop is not None:
                out.append((iid, p, crop))
        if frame.index >= last:
            break
    return out


def clip_crops(tracks: Sequence[Track], cfg: TrackFilterConfig, frames: Callable[..., Iterable[Any]] = stream_frames
               ) -> tuple[dict[str, list[dict]], list[tuple[str, dict, np.ndarray]]]:
    """The sampled points of each track of one clip, and their crops: the clip is decoded once for all of them.
    This is the CPU part; it runs on the prefetch thread."""
    samples = {t.instance_id: sample_points(t.points, cfg.clip_samples) for t in tracks}
    wanted: dict[int, list[tuple[str, dict]]] = collections.defaultdict(list)
    for iid, pts in samples.items():
        for p in pts:
            wanted[int(p["frame_index"])].append((iid, p))
    first = tracks[0]
    crops = crops_along_tracks(frames(first.video_path, first.start_s, first.end_s, first.track_fps) if wanted
                               else (), wanted, cfg.crop_padding)
    return samples, crops


def verdicts_for_clip(tracks: Sequence[Track], samples: dict[str, list[dict]],
                      crops: Sequence[tuple[str, dict, np.ndarray]], scores: Sequence[float],
                      cfg: TrackFilterConfig) -> list[TrackVerdict]:
    by_track: dict[str, list[tuple[dict, float]]] = collections.defaultdict(list)
    for (iid, p, _), s in zip(crops, scores):
        by_track[iid].append((p, float(s)))
    out = []
    for t in tracks:
        got = sorted(by_track.get(t.instance_id, []), key=lambda ps: ps[0]["t_s"])
        if samples[t.instance_id] and not got:
            out.append(error_verdict(t, (
                f"instance {t.instance_id}: none of the {len(samples[t.instance_id])} sampled frames could be "
                f"decoded or cropped from {t.video_path}; check the video, then re-run trackfilter")))
            continue
        out.append(judge(t, [p for p, _ in got], [s for _, s in got], cfg))
    return out


def decode_error_verdicts(tracks: Sequence[Track], exc: BaseException) -> list[TrackVerdict]:
    return [error_verdict(t, f"clip {t.clip_id}: cannot decode frames for CLIP crops from {t.video_path}: "
                             f"{type(exc).__name__}: {exc}") for t in tracks]


def filter_clips(groups: Sequence[Sequence[Track]], clip: Any, cfg: TrackFilterConfig,
                 frames: Callable[..., Iterable[Any]] = stream_frames,
                 progress=lambda done, total: None) -> list[TrackVerdict]:
    """Verdicts for the tracks of several clips (one group of tracks per clip), in the order of ``groups``.

    Each clip's crops are cut on a prefetch thread (``prefetch_depth`` clips ahead) while CLIP scores the
    current batch; the crops of ``batch_size`` clips go to CLIP in one ``score_pairs`` call. A clip that cannot
    be decoded gives error verdicts for its own tracks; the rest of its batch goes on.
    """
    from experts.video import VideoProbeError
    from stages.shared.prefetch import prefetched_batches

    decode_errors = (VideoProbeError, OSError, ValueError)
    rows: list[TrackVerdict] = []
    done = 0
    for chunk in prefetched_batches(groups, lambda tracks: clip_crops(tracks, cfg, frames), cfg.batch_size,
                                    cfg.prefetch_depth):
        ready = []
        images: list[np.ndarray] = []
        texts: list[str] = []
        per_clip: dict[int, list[TrackVerdict]] = {}
        for n, (tracks, got) in enumerate(chunk):
            if isinstance(got, decode_errors):
                per_clip[n] = decode_error_verdicts(tracks, got)
                continue
            if isinstance(got, Exception):
                raise got  # not a decode problem of this clip: the shard fails and is retried, as before
            samples, crops = got
            label = {t.instance_id: t.label for t in tracks}
            ready.append((n, tracks, samples, crops, len(images)))
            images += [c for _, _, c in crops]
            texts += [cfg.clip_template.format(label=label[iid]) for iid, _, _ in crops]
        scores = clip.score_pairs(images, texts, batch_size=cfg.clip_batch_size) if images else []
        if len(scores) != len(images):
            raise RuntimeError(f"CLIP returned {len(scores)} scores for {len(images)} crops")
        for n, tracks, samples, crops, offset in ready:
            per_clip[n] = verdicts_for_clip(tracks, samples, crops, scores[offset:offset + len(crops)], cfg)
        rows += [v for n in range(len(chunk)) for v in per_clip[n]]
        done += len(chunk)
        progress(done, len(groups))
    return rows


# -- the stage -----------------------------------------------------------------------------------------------
def load_clip_scorer(cfg: TrackFilterConfig):
    from experts.base import get_expert
    from experts.clip import load_clip

    return get_expert(cfg.clip, load_clip)


def process(ctx: ShardContext) -> list[TrackVerdict]:
    cfg: TrackFilterConfig = ctx.config
    groups: dict[str, list[Track]] = collections.defaultdict(list)
    for t in ctx.read_records("track", Track):
        groups[t.clip_id].append(t)
    if not groups:
        return []
    clip = ctx.expert(CLIP_EXPERT, lambda: load_clip_scorer(cfg))
    ordered = [sorted(tracks, key=lambda t: t.instance_id) for _, tracks in sorted(groups.items())]
    return filter_clips(ordered, clip, cfg, progress=ctx.progress)


def _expert(cfg: TrackFilterConfig) -> tuple[str, str | None]:
    return f"clip:{cfg.clip.arch}/{cfg.clip.model_id}", cfg.clip.revision


STAGE = Stage(
    name="trackfilter", schema=SCHEMA, inputs=("track",), config_cls=TrackFilterConfig, process=process,
    expert=_expert, resources=Resources(cpus=1, gpus=0.25), branch="imove_it",
    description="drop trajectories whose box area drifts from the first box, mostly invisible, or low CLIP score",
)
