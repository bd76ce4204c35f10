"""``trackfilter``: whether each trajectory is kept, and why not (iMOVE 3.1.1 Step-3, trajectory filter).

One row per trajectory. Kept ones have ``status="ok"``, ``kept=True``; dropped ones ``status="skipped"``,
``kept=False`` and the reason in both ``reason`` and ``error`` ("box area drifted: 3.10x the first box
(limit 2.5x)", "mean CLIP score 0.12 < 0.2", ...). Metrics are filled whenever they could be computed,
for kept and dropped trajectories alike, so thresholds can be re-tuned from the table.
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas._base import Record, record_schema

SCHEMA = record_schema(
    [
        pa.field("instance_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("kept", pa.bool_(), nullable=False),
        pa.field("reason", pa.string()),  # None when kept
        pa.field("max_area_ratio", pa.float64()),  # max over visible frames of max(a / a0, a0 / a), >= 1
        pa.field("area_ratio_min", pa.float64()),  # min of a / a0 (box area over first box area)
        pa.field("area_ratio_max", pa.float64()),  # max of a / a0
        pa.field("visible_fraction", pa.float64()),
        pa.field("mean_clip_score", pa.float64()),
        pa.field("clip_scores", pa.list_(pa.float64()), nullable=False),  # per sampled crop
        pa.field("clip_sample_t_s", pa.list_(pa.float64()), nullable=False),  # times of the sampled crops
    ],
    name="track_verdicts",
)
KEY = ("instance_id",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrackVerdict(Record):
    instance_id: str
    clip_id: str
    video_id: str
    label: str
    kept: bool
    clip_scores: list[float]
    clip_sample_t_s: list[float]
    reason: str | None = None
    max_area_ratio: float | None = None
    area_ratio_min: float | None = None
    area_ratio_max: float | None = None
    visible_fraction: float | None = None
    mean_clip_score: float | None = None
