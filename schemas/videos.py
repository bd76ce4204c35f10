"""``videos``: one row per input file found by ``ingest`` (ok, error or skipped by a filter)."""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas._base import Record, record_schema

SCHEMA = record_schema(
    [
        pa.field("video_id", pa.string(), nullable=False),  # sha256 of the bytes (first 32 hex); "path-…" if unreadable
        pa.field("uri", pa.string(), nullable=False),  # as given: local path or fsspec URL
        pa.field("path", pa.string(), nullable=False),  # a local path that decoders can open
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("size_bytes", pa.int64()),
        pa.field("duration_s", pa.float64()),
        pa.field("fps", pa.float64()),
        pa.field("frame_count", pa.int64()),
        pa.field("width", pa.int32()),  # display size, after rotation
        pa.field("height", pa.int32()),
        pa.field("codec", pa.string()),
        pa.field("rotation_deg", pa.int32()),
        pa.field("has_video_stream", pa.bool_()),
        pa.field("has_audio_stream", pa.bool_()),
    ],
    name="videos",
)
KEY = ("video_id", "uri")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Video(Record):
    video_id: str
    uri: str
    path: str
    shard: int
    size_bytes: int | None = None
    duration_s: float | None = None
    fps: float | None = None
    frame_count: int | None = None
    width: int | None = None
    height: int | None = None
    codec: str | None = None
    rotation_deg: int | None = None
    has_video_stream: bool | None = None
    has_audio_stream: bool | None = None
