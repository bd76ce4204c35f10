"""``ffilter``: the first-frame filter (MotionBench 3.1 / 9.3), one table with two row kinds.

* ``row_kind="verdict"``: one judge VLM's answer to one question from the clip's first frame only
  (``judge``, ``answer_letter`` parsed from ``raw_reply``, ``correct``). A judge that failed is an error row.
* ``row_kind="decision"``: one per question. ``kept`` is False when every judge answered correctly (the
  question is answerable from a single frame); such rows are ``status="skipped"`` with the reason.
  Kept questions are ``ok``; a question whose judges could not all answer is ``error``.

Key: (question_id, row_kind, judge); decision rows have ``judge="(all)"`` (:data:`ALL_JUDGES`).
"""
from __future__ import annotations

import dataclasses

import pyarrow as pa

from schemas._base import Record, record_schema

ROW_VERDICT = "verdict"
ROW_DECISION = "decision"
ALL_JUDGES = "(all)"  # the judge column of decision rows

SCHEMA = record_schema(
    [
        pa.field("question_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("row_kind", pa.string(), nullable=False),
        pa.field("judge", pa.string(), nullable=False),  # the judge's name in the config; "(all)" on decisions
        pa.field("judge_model", pa.string()),  # its model id
        pa.field("answer_letter", pa.string()),  # parsed letter, None when the reply named no single option
        pa.field("raw_reply", pa.string()),
        pa.field("correct", pa.bool_()),
        pa.field("n_judges", pa.int32()),  # decision rows
        pa.field("n_correct", pa.int32()),
        pa.field("kept", pa.bool_()),
    ],
    name="ffilter_verdicts",
)
KEY = ("question_id", "row_kind", "judge")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FilterVerdict(Record):
    question_id: str
    clip_id: str
    row_kind: str
    judge: str
    judge_model: str | None = None
    answer_letter: str | None = None
    raw_reply: str | None = None
    correct: bool | None = None
    n_judges: int | None = None
    n_correct: int | None = None
    kept: bool | None = None
