"""``descriptions``: one dynamic-information description per clip (MotionBench 3.1 / 9.1), from a VLM or a human.

The first frame is described separately from what moves (``first_frame_description`` vs ``dynamic_description``)
because the question prompt (seed 000, 9.2 guideline 9) treats the first-frame part as context only.
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas._base import Record, record_schema

SCHEMA = record_schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),
        pa.field("clip_path", pa.string()),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("first_frame_description", pa.string()),
        pa.field("dynamic_description", pa.string()),
        pa.field("source", pa.string(), nullable=False),  # "vlm" | "human" | "synthetic" (skipped rows)
        pa.field("annotator", pa.string()),  # human annotations: who wrote it, if given
        pa.field("num_frames", pa.int32()),  # frames shown to the VLM
        pa.field("prompt_version", pa.string()),  # describe prompt file version (VLM rows)
    ],
    name="descriptions",
)
KEY = ("clip_id",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Description(Record):
    clip_id: str
    video_id: str
    video_path: str
    clip_path: str | None = None
    start_s: float
    end_s: float
    first_frame_description: str | None = None
    dynamic_description: str | None = None
    source: str
    annotator: str | None = None
    num_frames: int | None = None
    prompt_version: str | None = None
