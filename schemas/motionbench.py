"""``motionbench``: the finished benchmark, one row per question (written by ``finalize``, global scope).

Options are in their final (balanced) order and ``answer`` is the correct letter for both splits; the
official export hides test answers (``NA``) and writes them to a separate key. ``key`` is the benchmark's
video key (our clip id: a MotionBench "video" is one event-level clip); ``split`` is by source video.
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas._base import Record, record_schema

SCHEMA = record_schema(
    [
        pa.field("question_id", pa.string(), nullable=False),  # also the export's qa uid
        pa.field("key", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),  # clip file if cut, else the source video
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("video_type", pa.string(), nullable=False),  # "real" | "virtual"
        pa.field("category", pa.string(), nullable=False),  # MR | LM | AO | RC | MO | CM
        pa.field("question_type", pa.string(), nullable=False),  # the category's full name
        pa.field("question", pa.string(), nullable=False),
        pa.field("options", pa.list_(pa.string()), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # "dev" | "test"
        pa.field("source", pa.string(), nullable=False),  # "generated" | "synthetic"
    ],
    name="motionbench",
)
KEY = ("question_id",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchmarkQuestion(Record):
    question_id: str
    key: str
    video_id: str
    video_path: str
    start_s: float | None = None
    end_s: float | None = None
    video_type: str
    category: str
    question_type: str
    question: str
    options: list[str]
    answer: str
    split: str
    source: str
