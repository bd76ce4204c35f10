"""SAMURAI's motion-aware mask choice and memory choice, one state per object (pure numpy).

SAM 2 decodes three candidate masks per object per frame and keeps the one with the highest predicted
mask IoU. SAMURAI (Yang et al. 2024, Sec. 4) adds a Kalman filter on the mask's box. The rules below are
the reference release's (yangchris11/samurai, ``sam2/sam2/modeling/sam2_base.py``,
``SAM2Base._forward_sam_heads`` and ``_prepare_memory_conditioned_features``), decision for decision:

* The filter starts on the first tracked frame after the prompt frame (the prompt frame decodes a single
  mask from its box, so there is nothing to choose and no filter update there).
* Start (no filter yet, or the stable count is 0): SAM's best-IoU candidate; its box starts the filter;
  stable count + 1.
* Warm-up (stable count < ``stable_frames_threshold``): predict; SAM's best-IoU candidate; when its
  predicted mask IoU is ``> stable_ious_threshold`` the box is a measurement and the count goes up,
  otherwise the count restarts at 0.
* Motion-aware phase: predict; candidates ranked by ``w * IoU(box, predicted box) + (1 - w) * predicted
  mask IoU`` (``w = kf_score_weight``, computed in float32 like the release's tensors); the chosen box is a
  measurement unless its predicted mask IoU is ``< stable_ious_threshold``, which restarts the count.
* Boxes are ``(x_min, y_min, x_max, y_max)`` with the *inclusive* max pixel index; an empty mask's box is
  ``(0, 0, 0, 0)``; a zero-height box is read with height 1 (the release's conversion), so empty masks
  never produce NaN.
* Memory (``admit_to_memory`` / ``select_memory``): frames from the second tracked frame on whose chosen
  mask has predicted IoU > 0.5, object logit > 0 and Kalman score > 0 (or none) are memory candidates; the
  newest ``num_maskmem - 1`` of them, plus the previous frame always, are attended to.

What is ours: the release keeps this state on the model, so one predictor tracks one object; here every
object owns a :class:`MotionState` and frames stream through. Two variations exist only as options, off by
default (``MotionConfig.motion_gate``, ``MotionConfig.skip_empty_measurements``); see their comments.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np

from experts.samurai.kalman import KalmanBoxFilter, prediction_iou, xyah_to_xyxy, xyxy_to_xyah

MotionGate = Literal["predicted_iou", "box_agreement"]


@dataclass(frozen=True)
class MotionConfig:
    """SAMURAI settings; defaults are the release's ``SAM2Base`` defaults.

    ``kf_score_weight`` 0.15 is the constructor default and the value of the release's
    ``configs/samurai/sam2.1_hiera_l.yaml``; its t / s / b+ configs use 0.25.
    """

    samurai_mode: bool = True
    stable_frames_threshold: int = 15
    stable_ious_threshold: float = 0.3
    kf_score_weight: float = 0.15
    # An object counts as present when its object-score logit exceeds this (the release lowers SAM 2's 0
    # to -1 in SAMURAI mode); absent objects get empty masks and the "no object" pointer.
    min_obj_score_logits: float = -1.0
    memory_bank_iou_threshold: float = 0.5
    memory_bank_obj_score_threshold: float = 0.0
    memory_bank_kf_score_threshold: float = 0.0
    # Variations of ours, off by default:
    # * "box_agreement": the chosen box is a Kalman measurement (and the stable count grows) only when it
    #   overlaps the predicted box by more than stable_ious_threshold, instead of when SAM's predicted mask
    #   IoU does. SAM's IoU head can be confident about a mask that jumped to a look-alike; gating on box
    #   agreement keeps such a jump out of the motion model.
    motion_gate: MotionGate = "predicted_iou"
    # * True: an empty chosen mask (object not visible) is no measurement: the filter only predicts, the
    #   count is unchanged and an empty mask never starts the filter. The release measures it as the box
    #   (0, 0, 0, 0), which drags the filter to the image corner while the object is occluded.
    skip_empty_measurements: bool = False

    def __post_init__(self) -> None:
        if self.motion_gate not in ("predicted_iou", "box_agreement"):
            raise ValueError(f"motion_gate must be 'predicted_iou' or 'box_agreement', got {self.motion_gate!r}")
        if self.stable_frames_threshold < 1:
            raise ValueError(f"stable_frames_threshold must be >= 1, got {self.stable_frames_threshold}")

    @property
    def object_present_logit(self) -> float:
        """Object-score logit above which an object is present: SAMURAI's threshold, or SAM 2's 0."""
        return self.min_obj_score_logits if self.samurai_mode else 0.0


@dataclass
class MotionState:
    """Kalman state of one object. ``mean is None`` until the filter starts (first tracked frame)."""

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
    return bool(np.all(box == 0))


def _f32_gt(a: float, b: float) -> bool:
    # The release compares float32 tensors with Python floats, which PyTorch casts to float32.
    return bool(np.float32(a) > np.float32(b))


def select_candidate(state: MotionState, kf: KalmanBoxFilter, cand_boxes_xyxy: np.ndarray,
                     pred_ious: np.ndarray, cfg: MotionConfig) -> Choice:
    """Pick one of ``M`` candidate masks for one object on one tracked frame and advance its filter.

    ``cand_boxes_xyxy``: ``[M, 4]`` boxes of the candidate masks in model pixels, inclusive max pixel index,
    ``(0, 0, 0, 0)`` for an empty mask; ``pred_ious``: ``[M]`` SAM's predicted mask IoUs. Plain SAM 2
    (``samurai_mode=False``) is the argmax of ``pred_ious`` and leaves the state untouched. Not called on
    the prompt frame.
    """
    boxes = np.asarray(cand_boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    ious = np.asarray(pred_ious, dtype=np.float32).reshape(-1)
    best_by_iou = int(np.argmax(ious))
    if not cfg.samurai_mode:
        state.history.append(best_by_iou)
        return Choice(best_by_iou, None)

    skip_empty = cfg.skip_empty_measurements
    if state.mean is None or state.stable_frames == 0:
        idx = best_by_iou
        if not (skip_empty and _is_empty(boxes[idx])):
            state.mean, state.cov = kf.initiate(xyxy_to_xyah(boxes[idx]))
            state.stable_frames += 1
        state.history.append(idx)
        return Choice(idx, None)

    state.mean, state.cov = kf.predict(state.mean, state.cov)
    predicted = xyah_to_xyxy(state.mean[:4])
    warm_up = state.stable_frames < cfg.stable_frames_threshold
    if warm_up:
        idx, kf_score = best_by_iou, None
    else:
        kf_ious = prediction_iou(predicted, boxes).astype(np.float32)
        w = cfg.kf_score_weight
        weighted = np.float32(w) * kf_ious + np.float32(1 - w) * ious
        idx = int(np.argmax(weighted))
        kf_score = float(kf_ious[idx])
    state.history.append(idx)
    chosen = boxes[idx]
    if skip_empty and _is_empty(chosen):
        return Choice(idx, kf_score)
    if cfg.motion_gate == "box_agreement":
        agrees = bool(prediction_iou(predicted, chosen[None])[0] > cfg.stable_ious_threshold)
    elif warm_up:
        agrees = _f32_gt(ious[idx], cfg.stable_ious_threshold)
    else:
        # the release's motion-aware phase resets only strictly below the threshold
        agrees = not _f32_gt(cfg.stable_ious_threshold, ious[idx])
    if agrees:
        state.mean, state.cov = kf.update(state.mean, state.cov, xyxy_to_xyah(chosen))
        if warm_up:
            state.stable_frames += 1  # the count stops growing once the motion-aware phase is reached
    else:
        state.stable_frames = 0
    return Choice(idx, kf_score)


# The release scans memory candidates from frame 2 on (prompt frame 0): the first tracked frame is
# never a memory candidate, though as the previous frame it is attended to on frame 2.
FIRST_MEMORY_CANDIDATE = 2


def admit_to_memory(best_iou: float, object_score_logit: float, kf_score: float | None,
                    cfg: MotionConfig, frames_after_prompt: int = FIRST_MEMORY_CANDIDATE) -> bool:
    """SAMURAI's memory gate for a tracked frame ``frames_after_prompt`` frames after the prompt frame.

    Plain SAM 2 admits every frame. ``kf_score=None`` (filter not in its motion-aware phase) passes.
    """
    if not cfg.samurai_mode:
        return True
    return (frames_after_prompt >= FIRST_MEMORY_CANDIDATE
            and best_iou > cfg.memory_bank_iou_threshold
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
