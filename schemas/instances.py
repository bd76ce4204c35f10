"""``instances``: boxes found by the open-vocabulary detector (Grounding DINO) on a clip's first frame.

iMOVE 3.1.1 Step-2. One row per detected box: ``status="ok"`` rows are the instances that go on to
tracking; boxes dropped as too large, as not matching their category (CLIP), or as duplicates of another
instance (NMS across tags) stay as ``status="skipped"`` rows with the reason in ``error``. A clip whose
detection failed as a whole is one ``status="error"`` row with ``label``/``box_xyxy_px`` empty.
``instance_id = uuid5(clip_id, label, box rounded to 1 px)``: the same detection gets the same id on re-runs.
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas._base import Record, record_schema

# x1, y1, x2, y2 in pixels of the decoded frame. A plain list, not a fixed-size one: this column is nullable,
# and null entries of a fixed-size list column written by pyarrow 26 fail to read in older pyarrow releases
# ("Expected all lists to be of size=4"), as seen on a GPU machine's image.
BOX = pa.list_(pa.float64())

SCHEMA = record_schema(
    [
        pa.field("instance_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),
        pa.field("start_frame", pa.int64(), nullable=False),
        pa.field("end_frame", pa.int64(), nullable=False),  # exclusive
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("fps", pa.float64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("frame_t_s", pa.float64()),  # presentation time of the frame the box was found on
        pa.field("label", pa.string()),  # the tag (category name) the detector was prompted with
        pa.field("tag_score", pa.float64()),
        pa.field("box_xyxy_px", BOX),
        pa.field("detection_score", pa.float64()),
        pa.field("area_ratio", pa.float64()),  # box area / frame area
        pa.field("clip_score", pa.float64()),  # cosine(crop, label); None when not computed (dropped earlier)
        pa.field("duplicate_of", pa.string()),  # NMS: the kept instance this box overlaps
        pa.field("duplicate_iou", pa.float64()),
    ],
    name="instances",
)
KEY = ("instance_id",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Instance(Record):
    instance_id: str
    clip_id: str
    video_id: str
    video_path: str
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    duration_s: float
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    frame_t_s: float | None = None
    label: str | None = None
    tag_score: float | None = None
    box_xyxy_px: list[float] | None = None
    detection_score: float | None = None
    area_ratio: float | None = None
    clip_score: float | None = None
    duplicate_of: str | None = None
    duplicate_iou: float | None = None
