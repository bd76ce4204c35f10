"""detect: boxes for every kept tag on a clip's first frame (iMOVE 3.1.1 Step-2: Instance Bounding Box Detection).

For each recognised category the open-vocabulary detector (Grounding DINO) finds all instances on the
clip's initial frame. Unreasonable boxes are then filtered, as in the paper: boxes that are excessively
large (``area_ratio > max_area_ratio``) and boxes whose CLIP similarity with their category name is low
(``clip_score < min_clip_score``). Boxes of different tags that cover the same thing ("dog" and "animal")
are de-duplicated by greedy non-maximum suppression across tags, best detection score first.

Every box is a row: kept ones are ``status="ok"`` instances that ``track`` follows; dropped ones are
``status="skipped"`` with the reason. ``instance_id = uuid5(clip_id, label, box rounded to whole pixels)``.
"""
from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Callable, Sequence

import numpy as np
from pydantic import Field, field_validator

from experts.clip import ClipSpec
from experts.grounding_dino import GroundingDinoSpec
from schemas._base import STATUS_ERROR, STATUS_OK, STATUS_SKIPPED
from schemas.instances import SCHEMA, Instance
from schemas.tags import ClipTags
from stages.base import Resources, ShardContext, Stage, StageConfig
from stages.shared.geometry import box_area, box_iou, clip_box, crop_box, rounded_box
from stages.imove_it.first_frame import FirstFrame, FrameReadError, clip_first_frame

DETECTOR_EXPERT = "detect.detector"
CLIP_EXPERT = "detect.clip"

# Any fixed UUID: only has to never change (ids must be equal across re-runs and machines).
INSTANCE_ID_NAMESPACE = uuid.UUID("0b7f3c52-2d8e-5a41-9c6d-4e1f8a2b7c90")


class DetectConfig(StageConfig):
    detector: GroundingDinoSpec = Field(default_factory=GroundingDinoSpec)  # grounding-dino-base
    # The reference release's usual thresholds.
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    max_boxes_per_tag: int | None = None  # keep only the best N boxes of each tag (None: all)
    min_box_side_px: float = 2.0  # thinner boxes are degenerate (nothing to crop, nothing to track)
    # "Excessively large" boxes (iMOVE 3.1.1): box area over frame area above this is dropped.
    max_area_ratio: float = 0.6
    # CLIP ViT-B/32 as in the paper; crop versus the category name in ``clip_template``.
    clip: ClipSpec = Field(default_factory=ClipSpec)
    clip_template: str = "a photo of a {label}."
    min_clip_score: float = 0.2
    crop_padding: float = 0.0  # grow each crop by this fraction of the box size per side before scoring
    # Greedy NMS across tags; boxes overlapping a better one by more than this are duplicates.
    nms_iou_threshold: float = 0.7
    # Tracking cost grows with instances per clip; keep at most the best N after NMS (None: all).
    max_instances_per_clip: int | None = None
    # Clips per Grounding DINO call (prompts of different clips are padded to the longest, see detect_clips).
    batch_size: int = 8
    # Throughput only (left out of the config hash): first frames decoded ahead of the detector (None: one
    # batch; 0: decode inline), and crops per CLIP forward pass (the surviving boxes of a whole batch of clips).
    prefetch_depth: int | None = Field(None, ge=0)
    clip_batch_size: int = 256

    RUN_ONLY_FIELDS = frozenset({"prefetch_depth", "clip_batch_size"})

    @field_validator("batch_size", "max_boxes_per_tag", "max_instances_per_clip", "clip_batch_size")
    @classmethod
    def _positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"must be >= 1 (or None where allowed), got {v}")
        return v


PROFILES = {
    "small": {"detector": {"model_id": "IDEA-Research/grounding-dino-tiny"},
              "clip": {"model_id": "openai", "arch": "ViT-B-32"}},
    # Random weights: accept every query box, but only the best 2 per tag, and any CLIP score.
    "tiny": {"detector": {"model_id": "tiny://grounding_dino"}, "clip": {"model_id": "tiny://clip"},
             "box_threshold": 0.0, "text_threshold": 0.0, "max_boxes_per_tag": 2, "max_instances_per_clip": 2,
             "min_clip_score": -1.0, "max_area_ratio": 1.0, "min_box_side_px": 1.0},
}


def instance_id(clip_id: str, label: str, box: Sequence[float], occurrence: int = 0) -> str:
    """uuid5 over clip, label and the box rounded to whole pixels (``occurrence`` > 0 only for exact repeats)."""
    x1, y1, x2, y2 = rounded_box(box)
    key = f"{clip_id}|{label}|{x1},{y1},{x2},{y2}" + (f"|{occurrence}" if occurrence else "")
    return str(uuid.uuid5(INSTANCE_ID_NAMESPACE, key))


@dataclasses.dataclass
class Candidate:
    """A detector box on its way through the filters; ``reason`` is set when a filter drops it."""

    label: str
    tag_score: float | None
    box: list[float]
    score: float
    area_ratio: float
    instance_id: str = ""
    clip_score: float | None = None
    duplicate_of: str | None = None
    duplicate_iou: float | None = None
    reason: str | None = None


def nms_across_tags(cands: list[Candidate], iou_threshold: float) -> None:
    """Greedy NMS over the candidates still alive, best detection score first (ties: label, box).

    A suppressed box records which kept instance it duplicates and by how much they overlap.
    """
    alive = sorted((c for c in cands if c.reason is None), key=lambda c: (-c.score, c.label, rounded_box(c.box)))
    kept: list[Candidate] = []
    for c in alive:
        for k in kept:
            iou = box_iou(c.box, k.box)
            if iou > iou_threshold:
                c.duplicate_of, c.duplicate_iou = k.instance_id, iou
                c.reason = (f"NMS: overlaps instance {k.instance_id} ({k.label!r}, score {k.score:.2f}) "
                            f"with IoU {iou:.2f} > {iou_threshold:g}")
                break
        else:
            kept.append(c)


def cap_instances(cands: list[Candidate], max_instances: int | None) -> None:
    """Keep the ``max_instances`` best surviving boxes (detection score); the rest are skipped with their rank."""
    if max_instances is None:
        return
    alive = sorted((c for c in cands if c.reason is None), key=lambda c: (-c.score, c.label, rounded_box(c.box)))
    for rank, c in enumerate(alive[max_instances:], start=max_instances + 1):
        c.reason = (f"over the per-clip cap: detection score {c.score:.2f} ranks {rank} > "
                    f"max_instances_per_clip={max_instances}")


def candidates_from_detections(clip_id: str, detections: Sequence[Any], tag_scores: dict[str, float],
                               width: int, height: int, cfg: DetectConfig) -> list[Candidate]:
    """Detector output -> candidates with stable ids; marks boxes over the per-tag cap, degenerate or too large."""
    from experts.grounding_dino import normalise_label

    per_label: dict[str, int] = {}
    seen: dict[str, int] = {}
    out: list[Candidate] = []
    frame_area = float(width * height)
    for det in sorted(detections, key=lambda d: (-float(d.score), normalise_label(d.label), tuple(d.box_xyxy_px))):
        label = normalise_label(det.label)
        per_label[label] = per_label.get(label, 0) + 1
        box = clip_box(det.box_xyxy_px, width, height)
        base = instance_id(clip_id, label, box)
        seen[base] = seen.get(base, -1) + 1
        c = Candidate(label=label, tag_score=tag_scores.get(label), box=box, score=float(det.score),
                      area_ratio=box_area(box) / frame_area if frame_area else float("nan"),
                      instance_id=instance_id(clip_id, label, box, seen[base]))
        bw, bh = box[2] - box[0], box[3] - box[1]
        if cfg.max_boxes_per_tag is not None and per_label[label] > cfg.max_boxes_per_tag:
            c.reason = (f"over the per-tag cap: detection score {c.score:.2f} ranks {per_label[label]} for "
                        f"{label!r} > max_boxes_per_tag={cfg.max_boxes_per_tag}")
        elif min(bw, bh) < cfg.min_box_side_px:
            c.reason = (f"degenerate box: {bw:.1f} x {bh:.1f} px, a side is below "
                        f"min_box_side_px={cfg.min_box_side_px:g}")
        elif c.area_ratio > cfg.max_area_ratio:
            c.reason = f"too large: area ratio {c.area_ratio:.2f} > {cfg.max_area_ratio:g}"
        out.append(c)
    return out


def score_clips_with_clip(per_clip: Sequence[tuple[list[Candidate], np.ndarray]], clip: Any,
                          cfg: DetectConfig) -> None:
    """CLIP cosine of each surviving crop (of each ``(candidates, frame)`` clip) with its category prompt; low ones
    are dropped. The crops of all the clips go in one ``score_pairs`` call (``clip_batch_size`` crops per
    forward pass), so the CLIP model sees full batches."""
    todo: list[tuple[Candidate, np.ndarray]] = []
    for cands, image in per_clip:
        for c in cands:
            if c.reason is not None:
                continue
            crop = crop_box(image, c.box, cfg.crop_padding)
            if crop is None:
                c.reason = "empty crop: the box holds no pixels of the frame"
            else:
                todo.append((c, crop))
    if not todo:
        return
    scores = clip.score_pairs([crop for _, crop in todo], [cfg.clip_template.format(label=c.label) for c, _ in todo],
                              batch_size=cfg.clip_batch_size)
    if len(scores) != len(todo):
        raise RuntimeError(f"CLIP returned {len(scores)} scores for {len(todo)} crops")
    for (c, _), s in zip(todo, scores):
        c.clip_score = float(s)
        if c.clip_score < cfg.min_clip_score:
            c.reason = f"CLIP: score {c.clip_score:.3f} < {cfg.min_clip_score:g} for {c.label!r}"


def instance_row(tags: ClipTags, frame: FirstFrame | None, **kw: Any) -> Instance:
    return Instance(
        clip_id=tags.clip_id, video_id=tags.video_id, video_path=tags.video_path, start_frame=tags.start_frame,
        end_frame=tags.end_frame, start_s=tags.start_s, end_s=tags.end_s, duration_s=tags.duration_s, fps=tags.fps,
        width=None if frame is None else int(frame.image.shape[1]),
        height=None if frame is None else int(frame.image.shape[0]),
        frame_t_s=None if frame is None else frame.t_s, **kw,
    )


def rows_for_clip(tags: ClipTags, frame: FirstFrame, cands: list[Candidate]) -> list[Instance]:
    return [
        instance_row(tags, frame, instance_id=c.instance_id, label=c.label, tag_score=c.tag_score,
                     box_xyxy_px=[float(v) for v in c.box], detection_score=c.score, area_ratio=c.area_ratio,
                     clip_score=c.clip_score, duplicate_of=c.duplicate_of, duplicate_iou=c.duplicate_iou,
                     status=STATUS_OK if c.reason is None else STATUS_SKIPPED, error=c.reason)
        for c in sorted(cands, key=lambda c: (c.reason is not None, -c.score, c.label, rounded_box(c.box)))
    ]


def clip_error_row(tags: ClipTags, frame: FirstFrame | None, message: str) -> Instance:
    return instance_row(tags, frame, instance_id=str(uuid.uuid5(INSTANCE_ID_NAMESPACE, f"{tags.clip_id}|<clip>")),
                        status=STATUS_ERROR, error=message)


def detect_clips(tag_rows: Sequence[ClipTags], detector: Any, clip: Any, cfg: DetectConfig,
                 read_frame: Callable[[str, float, float], FirstFrame] = clip_first_frame,
                 progress=lambda done, total: None) -> list[Instance]:
    """All instance rows for ``tag_rows``, in the order of the clips.

    First frames are decoded on a prefetch thread (``prefetch_depth`` clips ahead) while the models work on the
    current batch. ``batch_size`` clips share one Grounding DINO call: the expert puts same-size frames in one
    forward pass with each clip's own prompt, padded to the longest (masked text positions take no part), and
    the surviving boxes of all of them are CLIP-scored in one call. A clip whose first frame cannot be read is
    one error row; the rest of its batch goes on.
    """
    from stages.shared.prefetch import prefetched_batches

    todo = [t for t in tag_rows if t.tags]
    per_clip: dict[int, list[Instance]] = {}  # id(tag row) -> its rows
    done = 0
    for chunk in prefetched_batches(todo, lambda t: read_frame(t.video_path, t.start_s, t.end_s), cfg.batch_size,
                                    cfg.prefetch_depth):
        ready: list[tuple[ClipTags, FirstFrame]] = []
        for t, frame in chunk:
            if isinstance(frame, FrameReadError):
                per_clip[id(t)] = [clip_error_row(t, None, f"clip {t.clip_id}: {frame}")]
            elif isinstance(frame, Exception):
                raise frame  # not a per-clip read problem: the shard fails and is retried, as before
            elif t.width is not None and (frame.image.shape[1], frame.image.shape[0]) != (t.width, t.height):
                per_clip[id(t)] = [clip_error_row(t, frame, (
                    f"clip {t.clip_id}: first frame is {frame.image.shape[1]}x{frame.image.shape[0]} but the tag "
                    f"row says {t.width}x{t.height}; the video changed since tagging, re-run tag for this shard"))]
            else:
                ready.append((t, frame))
        if ready:
            dets = detector.detect([f.image for _, f in ready], [[x["tag"] for x in t.tags] for t, _ in ready],
                                   box_threshold=cfg.box_threshold, text_threshold=cfg.text_threshold,
                                   batch_size=cfg.batch_size)
            if len(dets) != len(ready):
                raise RuntimeError(f"detector returned {len(dets)} results for {len(ready)} images")
            cands_of = []
            for (t, frame), clip_dets in zip(ready, dets):
                h, w = frame.image.shape[:2]
                cands_of.append(candidates_from_detections(t.clip_id, clip_dets,
                                                           {x["tag"]: x["score"] for x in t.tags}, w, h, cfg))
            score_clips_with_clip([(cands, frame.image) for cands, (_, frame) in zip(cands_of, ready)], clip, cfg)
            for cands, (t, frame) in zip(cands_of, ready):
                nms_across_tags(cands, cfg.nms_iou_threshold)
                cap_instances(cands, cfg.max_instances_per_clip)
                per_clip[id(t)] = rows_for_clip(t, frame, cands)
        done += len(chunk)
        progress(done, len(todo))
    return [row for t in todo for row in per_clip[id(t)]]


# -- the stage -----------------------------------------------------------------------------------------------
def load_detector(cfg: DetectConfig):
    from experts.base import get_expert
    from experts.grounding_dino import load_grounding_dino

    return get_expert(cfg.detector, load_grounding_dino)


def load_clip_scorer(spec: ClipSpec):
    from experts.base import get_expert
    from experts.clip import load_clip

    return get_expert(spec, load_clip)


def process(ctx: ShardContext) -> list[Instance]:
    cfg: DetectConfig = ctx.config
    tag_rows = ctx.read_records("tag", ClipTags)
    if not any(t.tags for t in tag_rows):
        return []
    detector = ctx.expert(DETECTOR_EXPERT, lambda: load_detector(cfg))
    clip = ctx.expert(CLIP_EXPERT, lambda: load_clip_scorer(cfg.clip))
    return detect_clips(tag_rows, detector, clip, cfg, progress=ctx.progress)


def _expert(cfg: DetectConfig) -> tuple[str, str | None]:
    return f"grounding_dino:{cfg.detector.model_id}+clip:{cfg.clip.arch}/{cfg.clip.model_id}", cfg.detector.revision


STAGE = Stage(
    name="detect", schema=SCHEMA, inputs=("tag",), config_cls=DetectConfig, process=process, expert=_expert,
    resources=Resources(cpus=1, gpus=1), branch="imove_it",
    description="Grounding DINO boxes per tag on the first frame; drop too-large / low-CLIP boxes; NMS across tags",
)
