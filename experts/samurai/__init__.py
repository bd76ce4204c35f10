"""SAMURAI tracking expert: SAM 2.1 + per-object Kalman motion cues, streaming and multi-object.

``kalman`` and ``motion`` are pure numpy; ``tracker`` imports torch and sam2 lazily inside its functions,
so importing this package is cheap and registers the ``tiny://sam2`` builder.
"""
from __future__ import annotations

from experts.samurai.kalman import KalmanBoxFilter, box_iou, prediction_iou, xyah_to_xyxy, xyxy_to_xyah
from experts.samurai.motion import (
    Choice,
    MotionConfig,
    MotionState,
    admit_to_memory,
    select_candidate,
    select_memory,
)
from experts.samurai.tracker import (
    SamuraiSpec,
    SamuraiTracker,
    TrackPoint,
    TrackSession,
    build_tiny_sam2,
    load_tracker,
    mask_to_rle,
    resolve_sam2_checkpoint,
    rle_to_mask,
)

__all__ = [
    "Choice", "KalmanBoxFilter", "MotionConfig", "MotionState", "SamuraiSpec", "SamuraiTracker", "TrackPoint",
    "TrackSession", "admit_to_memory", "box_iou", "build_tiny_sam2", "load_tracker", "mask_to_rle",
    "prediction_iou", "resolve_sam2_checkpoint", "rle_to_mask", "select_candidate", "select_memory",
    "xyah_to_xyxy", "xyxy_to_xyah",
]
