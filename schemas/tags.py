"""``tags``: what the tagging expert (RAM++ or the CLIP zero-shot tagger) recognised on a clip's first frame.

iMOVE 3.1.1 Step-1: tags from the initial frame, minus static categories (sky, cloud, road, room, ...).
One row per clip. ``tags`` are the categories kept for detection; ``dropped_tags`` are those removed by the
static-category blocklist, kept so that the drop is visible. The clip span rides along so ``detect`` and
``track`` need no join with ``clips``.
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas._base import Record, record_schema

# One recognised category and the tagger's score for it (RAM++: sigmoid; CLIP: softmax-free cosine-based).
TAG_SCORE = pa.struct([pa.field("tag", pa.string(), nullable=False), pa.field("score", pa.float64(), nullable=False)])

SCHEMA = record_schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),
        pa.field("start_frame", pa.int64(), nullable=False),
        pa.field("end_frame", pa.int64(), nullable=False),  # exclusive
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("duration_s", pa.float64(), nullable=False),
        pa.field("fps", pa.float64()),
        pa.field("width", pa.int32()),  # size of the decoded first frame; None when it could not be read
        pa.field("height", pa.int32()),
        pa.field("frame_t_s", pa.float64()),  # presentation time of the frame that was tagged
        pa.field("tagger", pa.string(), nullable=False),  # "ram_plus" | "clip"
        pa.field("tags", pa.list_(TAG_SCORE), nullable=False),  # kept, by descending score
        pa.field("dropped_tags", pa.list_(TAG_SCORE), nullable=False),  # removed by the static blocklist
    ],
    name="tags",
)
KEY = ("clip_id",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClipTags(Record):
    clip_id: str
    video_id: str
    video_path: str
    start_frame: int
    end_frame: int
    start_s: float
    end_s: float
    duration_s: float
    tagger: str
    tags: list[dict]  # [{"tag": str, "score": float}, ...]
    dropped_tags: list[dict]
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    frame_t_s: float | None = None
