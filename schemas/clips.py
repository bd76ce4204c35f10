"""``clips``: event-level spans cut from a video by ``scenes`` (Panda-70M style); dropped spans keep a reason."""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas._base import Record, record_schema

SCHEMA = record_schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),  # uuid5(video_id, start_s, end_s)
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),
        pa.field("scene_index", pa.int32(), nullable=False),
        pa.field("part_index", pa.int32(), nullable=False),  # > 0 when an over-long scene was split
        pa.field("start_frame", pa.int64(), nullable=False),
        pa.field("end_frame", pa.int64(), nullable=False),  # exclusive
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("fps", pa.float64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("clip_path", pa.string()),  # set when the optional cut step wrote a file
        pa.field("cut_mode", pa.string()),  # "copy" | "reencode" | None
    ],
    name="clips",
)
KEY = ("clip_id",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Clip(Record):
    clip_id: str
    video_id: str
    video_path: str
    scene_index: int
    part_index: int
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    duration_s: float
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    clip_path: str | None = None
    cut_mode: str | None = None
