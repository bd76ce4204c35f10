"""``tracks``: one SAMURAI trajectory per instance over its clip (iMOVE 3.1.1 Step-3).

``points`` holds one entry per tracked frame (frames sampled at ``track_fps``), in time order:
``t_s`` is the presentation time in the source video (same clock as ``start_s``), ``frame_index`` the
frame's index in the source video, ``box_xyxy_px`` None where the mask is empty. Whether the trajectory
is good enough is decided by ``trackfilter`` (table ``trackfilter``, joined on ``instance_id``).
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas._base import Record, record_schema

BOX = pa.list_(pa.float64(), 4)  # x1, y1, x2, y2 pixels; non-null columns only
# Nullable boxes are plain lists: null entries of fixed-size lists fail to read in older pyarrow releases.
BOX_OR_NONE = pa.list_(pa.float64())
TRACK_POINT = pa.struct([
    pa.field("t_s", pa.float64(), nullable=False),
    pa.field("frame_index", pa.int64(), nullable=False),
    pa.field("box_xyxy_px", BOX_OR_NONE),
    pa.field("visible", pa.bool_(), nullable=False),
    pa.field("mask_area_px", pa.int64(), nullable=False),
    pa.field("object_score", pa.float64(), nullable=False),
    pa.field("kf_score", pa.float64()),
])

SCHEMA = record_schema(
    [
        pa.field("instance_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("first_box_xyxy_px", BOX, nullable=False),  # the detect box the tracker was prompted with
        pa.field("track_fps", pa.float64()),  # sampling rate of the tracked frames; None = every frame
        pa.field("num_frames", pa.int32(), nullable=False),
        pa.field("num_visible", pa.int32(), nullable=False),
        pa.field("points", pa.list_(TRACK_POINT), nullable=False),
    ],
    name="tracks",
)
KEY = ("instance_id",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Track(Record):
    instance_id: str
    clip_id: str
    video_id: str
    video_path: str
    label: str
    start_s: float
    end_s: float
    duration_s: float
    first_box_xyxy_px: list[float]
    num_frames: int
    num_visible: int
    points: list[dict]  # [{"t_s", "frame_index", "box_xyxy_px", "visible", "mask_area_px", "object_score", "kf_score"}]
    width: int | None = None
    height: int | None = None
    track_fps: float | None = None
