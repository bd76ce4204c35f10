"""``tasks``: the iMOVE-IT instruction samples (iMOVE 3.1.2), one row per (instance, task).

``task`` is spatial_grounding | temporal_grounding | dynamic_captioning. Times ``t1_s``/``t2_s`` are relative
to the clip (0 = clip start); ``*_token`` fields hold the relative position tokens of 3.2.2 (time in
[0, 300], coordinates in [0, 1000]). ``conversations`` is LLaVA style: [{"from": "human"|"gpt", "value"}],
the first human turn starting with the ``<video>`` placeholder.
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas._base import Record, record_schema

BOX = pa.list_(pa.float64(), 4)
BOX_TOKENS = pa.list_(pa.int32(), 4)
TURN = pa.struct([pa.field("from", pa.string(), nullable=False), pa.field("value", pa.string(), nullable=False)])
TASKS = ("spatial_grounding", "temporal_grounding", "dynamic_captioning")

SCHEMA = record_schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),  # uuid5(instance_id, task)
        pa.field("task", pa.string(), nullable=False),
        pa.field("instance_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),
        pa.field("clip_start_s", pa.float64(), nullable=False),
        pa.field("clip_end_s", pa.float64(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("t1_s", pa.float64(), nullable=False),
        pa.field("t2_s", pa.float64(), nullable=False),
        pa.field("t1_token", pa.int32(), nullable=False),
        pa.field("t2_token", pa.int32(), nullable=False),
        pa.field("box1_xyxy_px", BOX, nullable=False),
        pa.field("box2_xyxy_px", BOX, nullable=False),
        pa.field("box1_tokens", BOX_TOKENS, nullable=False),
        pa.field("box2_tokens", BOX_TOKENS, nullable=False),
        pa.field("static_caption", pa.string()),
        pa.field("dynamic_caption", pa.string(), nullable=False),
        pa.field("template_id", pa.string(), nullable=False),
        pa.field("conversations", pa.list_(TURN), nullable=False),
    ],
    name="imove_it",
)
KEY = ("sample_id",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImoveItSample(Record):
    sample_id: str
    task: str
    instance_id: str
    clip_id: str
    video_id: str
    video_path: str
    clip_start_s: float
    clip_end_s: float
    duration_s: float
    width: int
    height: int
    label: str
    t1_s: float
    t2_s: float
    t1_token: int
    t2_token: int
    box1_xyxy_px: list[float]
    box2_xyxy_px: list[float]
    box1_tokens: list[int]
    box2_tokens: list[int]
    dynamic_caption: str
    template_id: str
    conversations: list[dict]
    static_caption: str | None = None
