"""``questions``: four-option single-choice questions about one clip (MotionBench 3.1 / 9.2).

Written by ``qgen`` (an LLM over a description, ``source="generated"``) and by ``synthqa`` (from a synthetic
video's ground truth, ``source="synthetic"``). ``options`` holds the four option texts in the generated order
and ``answer`` the letter of the correct one; ``finalize`` re-orders options to balance letters.
``question_id = uuid5(clip namespace, normalised question text)`` (see :func:`stages.shared.motionbench_questions.question_id`).
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas._base import Record, record_schema

SCHEMA = record_schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("video_id", pa.string(), nullable=False),
        pa.field("video_path", pa.string(), nullable=False),
        pa.field("clip_path", pa.string()),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # "generated" | "synthetic"
        pa.field("question", pa.string()),
        pa.field("options", pa.list_(pa.string())),  # exactly four on ok rows
        pa.field("answer", pa.string()),  # "A".."D"
        pa.field("category", pa.string()),  # MR | LM | AO | RC | MO | CM
        pa.field("content_dimensions", pa.list_(pa.string())),  # e.g. ["1.1"] (9.2 content dimension codes)
        pa.field("logic_dimension", pa.int32()),  # 1..4 (9.2 question-logic dimension)
        pa.field("kind", pa.string()),  # synthetic questions: the builder's kind (repetition_count, ...)
        pa.field("generation_index", pa.int32()),  # position in the LLM reply / truth builder order
        pa.field("prompt_version", pa.string()),  # qgen prompt file version
        pa.field("attempts", pa.int32()),  # LLM calls spent (1 + repair re-asks)
        pa.field("raw", pa.string()),  # error rows: the (last) raw reply, for debugging the prompt
    ],
    name="questions",
)
KEY = ("question_id",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Question(Record):
    question_id: str
    clip_id: str
    video_id: str
    video_path: str
    clip_path: str | None = None
    start_s: float
    end_s: float
    source: str
    question: str | None = None
    options: list[str] | None = None
    answer: str | None = None
    category: str | None = None
    content_dimensions: list[str] | None = None
    logic_dimension: int | None = None
    kind: str | None = None
    generation_index: int | None = None
    prompt_version: str | None = None
    attempts: int | None = None
    raw: str | None = None
