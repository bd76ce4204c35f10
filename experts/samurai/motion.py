"""SAMURAI's motion-aware mask choice and memory choice, one state per object (pure numpy).

SAM 2 decodes three candidate masks per object per frame and keeps the one with the highest predicted
mask IoU. SAMURAI (Yang et al. 2024, Sec. 4) adds a Kalman filter on the mask's box: once the filter
has seen ``stable_frames_threshold`` consistent frames, candidates are ranked by
``w * IoU(candidate box, predicted box) + (1 - w) * predicted mask IoU``. The same scores then decide
which past frames may enter the memory bank. The reference release keeps this state on the model and
so tracks one object per predictor; here every object owns a :class:`MotionState`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from experts.samurai.kalman import KalmanBoxFilter, box_iou, xyah_to_xyxy, xyxy_to_xyah


@dataclass(frozen=True)
class MotionConfig:
    """SAMURAI defaults (reference release and ARCHITECTURE.md)."""

    samurai_mode: bool = True
    stable_frames_threshold: int = 15
    stable_ious_threshold: float = 0.3
    kf_score_weight: float = 0.15
    memory_bank_iou_threshold: float = 0.5
    memory_bank_obj_score_threshold: float = 0.0
    memory_bank_kf_score_threshold: float = 0.0


@dataclass
class MotionState:
    """Kalman state of one object. ``mean is None`` until the object has had a non-empty mask."""

    mean: np.ndarray | None = None
    cov: np.ndarray | None = None
    stable_frames: int = 0
    history: list[int] = field(default_factory=list)  # chosen candidate per frame, for debugging/tests

    @property
    def predicted_box_xyxy(self) -> np.ndarray | None:
        return None if self.mean is None else xyah_to_xyxy(self.mean[:4])


@dataclass(frozen=True)
class Choice:
    index: int                 # chosen candidate
    kf_score: float | None     # IoU(chosen box, predicted box) in the motion-aware phase, else None


def _is_empty(box: np.ndarray) -> bool:
    return not (box[2] > box[0] and box[3] > box[1])


def observe_prompt(state: MotionState, kf: KalmanBoxFilter, box_xyxy: Sequence[float]) -> None:
    """Start the filter from the prompt frame's mask box (counts as the first stable frame)."""
    box = np.asarray(box_xyxy, dtype=np.float64)
    if _is_empty(box):
        return
    state.mean, state.cov = kf.initiate(xyxy_to_xyah(box))
    state.stable_frames = 1


def select_candidate(state: MotionState, kf: KalmanBoxFilter, cand_boxes_xyxy: np.ndarray,
                     pred_ious: np.ndarray, cfg: MotionConfig) -> Choice:
    """Pick one of ``M`` candidate masks for one object and advance its filter by one frame.

    ``cand_boxes_xyxy``: ``[M, 4]`` boxes of the candidate masks (all zeros for an empty mask);
    ``pred_ious``: ``[M]`` SAM's predicted mask IoUs. Plain SAM 2 (``samurai_mode=False``) is the argmax
    of ``pred_ious`` and leaves the state untouched.

    The filter takes the chosen box as a measurement only when it agrees with the prediction
    (``IoU(chosen box, predicted box) > stable_ious_threshold``); otherwise the stable count restarts
    and the next frame re-seeds the filter. (The reference release gates this on SAM's predicted mask
    IoU instead; gating on box agreement keeps a confidently wrong mask out of the motion model.)
    An empty chosen mask (object not visible) is no measurement: the filter only predicts.
    """
    boxes = np.asarray(cand_boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    ious = np.asarray(pred_ious, dtype=np.float64).reshape(-1)
    best_by_iou = int(np.argmax(ious))
    if not cfg.samurai_mode:
        state.history.append(best_by_iou)
        return Choice(best_by_iou, None)

    if state.mean is None or state.stable_frames == 0:
        # (Re)start: no trustworthy motion yet, so SAM's own ranking decides and seeds the filter.
        idx = best_by_iou
        if not _is_empty(boxes[idx]):
            state.mean, state.cov = kf.initiate(xyxy_to_xyah(boxes[idx]))
            state.stable_frames = 1
        state.history.append(idx)
        return Choice(idx, None)

    state.mean, state.cov = kf.predict(state.mean, state.cov)
    predicted = xyah_to_xyxy(state.mean[:4])
    motion_ious = box_iou(predicted, boxes)
    if state.stable_frames < cfg.stable_frames_threshold:
        idx = best_by_iou
        kf_score = None
    else:
        w = cfg.kf_score_weight
        idx = int(np.argmax(w * motion_ious + (1.0 - w) * ious))
        kf_score = float(motion_ious[idx])
    chosen = boxes[idx]
    if _is_empty(chosen):
        # Object not visible: coast on the prediction; nothing to measure.
        pass
    elif motion_ious[idx] > cfg.stable_ious_threshold:
        state.mean, state.cov = kf.update(state.mean, state.cov, xyxy_to_xyah(chosen))
        state.stable_frames += 1
    else:
        # The chosen mask does not move like the object did: motion is no longer trusted.
        state.stable_frames = 0
    state.history.append(idx)
    return Choice(idx, kf_score)


def admit_to_memory(best_iou: float, object_score_logit: float, kf_score: float | None,
                    cfg: MotionConfig) -> bool:
    """SAMURAI's memory gate: a frame is a memory candidate only if all three scores pass.

    Plain SAM 2 admits every frame. ``kf_score=None`` (filter not yet in its motion-aware phase) passes.
    """
    if not cfg.samurai_mode:
        return True
    return (best_iou > cfg.memory_bank_iou_threshold
            and object_score_logit > cfg.memory_bank_obj_score_threshold
            and (kf_score is None or kf_score > cfg.memory_bank_kf_score_threshold))


def select_memory(admitted: Sequence[int], last: int | None, capacity: int) -> list[int]:
    """Frames (oldest first) to condition on: the newest ``capacity`` admitted ones, plus the last frame.

    The most recent frame is always kept, even when the gate rejected it, so the tracker never loses its
    short-term context (SAMURAI reference behaviour).
    """
    chosen = list(admitted)
    if last is not None and (not chosen or chosen[-1] != last):
        chosen.append(last)
    return chosen[-capacity:] if capacity > 0 else []
