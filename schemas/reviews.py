"""``reviews``: the manual check (MotionBench 9.4), one row per question that passed the first-frame filter.

Carries the question as it goes forward (edited content when a reviewer edited it) plus the decision:
``accept`` | ``reject`` | ``edit`` | ``pending`` (no decision yet). Rows that go forward are ``ok``; rejected
ones, and pending ones when review is required, are ``skipped`` with the reason.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt

import pyarrow as pa

from schemas._base import Record, record_schema

SCHEMA = record_schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),
        pa.field("clip_path", pa.string()),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("question", pa.string()),
        pa.field("options", pa.list_(pa.string())),
        pa.field("answer", pa.string()),
        pa.field("category", pa.string()),
        pa.field("decision", pa.string(), nullable=False),  # accept | reject | edit | pending
        pa.field("reviewer", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("decided_at", pa.timestamp("us", tz="UTC")),
        pa.field("edited", pa.bool_(), nullable=False),
        pa.field("review_mode", pa.string(), nullable=False),  # required | optional | off
    ],
    name="reviews",
)
KEY = ("question_id",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Review(Record):
    question_id: str
    clip_id: str
    video_id: str
    video_path: str
    clip_path: str | None = None
    start_s: float
    end_s: float
    question: str | None = None
    options: list[str] | None = None
    answer: str | None = None
    category: str | None = None
    decision: str
    reviewer: str | None = None
    reason: str | None = None
    decided_at: _dt.datetime | None = None
    edited: bool = False
    review_mode: str
