"""``caption``: static (appearance) then dynamic (motion) caption of each kept instance (iMOVE 3.1.1 Step-4).

``t1_s``/``t2_s`` bound the instance's motion segment (first and last visible tracked frame, source-video
clock) and ``box1``/``box2`` are its boxes there; the tasks stage builds its three tasks from these.
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas._base import Record, record_schema

BOX = pa.list_(pa.float64(), 4)

SCHEMA = record_schema(
    [
        pa.field("instance_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("clip_start_s", pa.float64(), nullable=False),
        pa.field("clip_end_s", pa.float64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("t1_s", pa.float64(), nullable=False),
        pa.field("t2_s", pa.float64(), nullable=False),
        pa.field("box1_xyxy_px", BOX, nullable=False),
        pa.field("box2_xyxy_px", BOX, nullable=False),
        pa.field("static_caption", pa.string()),
        pa.field("dynamic_caption", pa.string()),
        pa.field("prompt_version", pa.string(), nullable=False),  # e.g. "static_caption.v1+dynamic_caption.v1"
        pa.field("frame_times_s", pa.list_(pa.float64()), nullable=False),  # frames shown for the dynamic caption
    ],
    name="captions",
)
KEY = ("instance_id",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Caption(Record):
    instance_id: str
    clip_id: str
    video_id: str
    video_path: str
    label: str
    clip_start_s: float
    clip_end_s: float
    width: int
    height: int
    t1_s: float
    t2_s: float
    box1_xyxy_px: list[float]
    box2_xyxy_px: list[float]
    prompt_version: str
    frame_times_s: list[float]
    static_caption: str | None = None
    dynamic_caption: str | None = None
