"""``check``: a second VLM's verdict on each dynamic caption (iMOVE 3.1.1 Step-4, the checker).

``accepted`` = the caption is correct AND refers to this instance only. Rejected captions are
``status="skipped"`` with the judge's reason in ``reason`` and ``error``.
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas._base import Record, record_schema

SCHEMA = record_schema(
    [
        pa.field("instance_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("accepted", pa.bool_(), nullable=False),
        pa.field("correct", pa.bool_()),  # None when the reply could not be read
        pa.field("unique", pa.bool_()),
        pa.field("reason", pa.string()),
        pa.field("raw_reply", pa.string()),
        pa.field("prompt_version", pa.string(), nullable=False),
    ],
    name="caption_verdicts",
)
KEY = ("instance_id",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CaptionVerdict(Record):
    instance_id: str
    clip_id: str
    accepted: bool
    prompt_version: str
    correct: bool | None = None
    unique: bool | None = None
    reason: str | None = None
    raw_reply: str | None = None
