"""ffilter: the first-frame filter (MotionBench 3.1, appendix 9.3).

"We use various image VLMs to predict answers using the first frame as input and discard questions that are
answered correctly by all VLMs" (GPT-4o, Qwen2-VL and GLM-4V-plus in the paper). Each judge sees only the
clip's first frame and the question with its options, and must answer with a letter. A question is dropped
(``status="skipped"``) exactly when every judge answered it correctly; the answer of each judge is kept as a
verdict row (see :mod:`schemas.ffilter_verdicts`). A judge that fails on a question is an error verdict;
with ``on_judge_error="error"`` (default) the question's decision is then an error too (re-run ffilter when
the judge works: successful answers are cached), with ``"keep"`` the question goes on to review.
"""
from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from experts.vlm import VlmSpec
from schemas._base import STATUS_ERROR, STATUS_OK, STATUS_SKIPPED
from schemas.ffilter_verdicts import ALL_JUDGES, ROW_DECISION, ROW_VERDICT, SCHEMA, FilterVerdict
from schemas.questions import Question
from stages.base import Resources, ShardContext, Stage, StageConfig, chat_expert_name, chat_resources
from stages.shared.motionbench_format import LETTERS, extract_letter, format_question, prompt_for


class Judge(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    name: str
    vlm: VlmSpec


PAPER_JUDGES = (
    Judge(name="gpt-4o", vlm=VlmSpec(model_id="gpt-4o", backend="openai", max_new_tokens=8, max_image_side_px=768)),
    # Served by any OpenAI-compatible server (vLLM / SGLang); point base_url at it.
    Judge(name="qwen2-vl", vlm=VlmSpec(model_id="Qwen/Qwen2-VL-72B-Instruct", backend="openai",
                                       base_url="http://localhost:8000/v1", api_key_env=None, max_new_tokens=8)),
    Judge(name="glm-4v-plus", vlm=VlmSpec(model_id="glm-4v-plus", backend="openai",
                                          base_url="https://open.bigmodel.cn/api/paas/v4", api_key_env="ZHIPUAI_API_KEY",
                                          max_new_tokens=8)),
)


class FfilterConfig(StageConfig):
    judges: tuple[Judge, ...] = PAPER_JUDGES
    frame_short_side_px: int | None = Field(448, ge=32)
    on_judge_error: Literal["error", "keep"] = "error"
    # Throughput only (left out of the config hash): clips whose first frames are decoded ahead of the judges
    # on a prefetch thread (None: one model batch; 0: decode inline).
    prefetch_depth: int | None = Field(None, ge=0)

    RUN_ONLY_FIELDS = frozenset({"prefetch_depth"})

    @model_validator(mode="after")
    def _check(self) -> "FfilterConfig":
        if not self.judges:
            raise ValueError("ffilter needs at least one judge VLM")
        names = [j.name for j in self.judges]
        if len(set(names)) != len(names):
            raise ValueError(f"ffilter judge names must be unique, got {names}")
        return self


PROFILES = {
    "small": {"judges": [
        {"name": "qwen2-vl-2b", "vlm": {"model_id": "Qwen/Qwen2-VL-2B-Instruct", "backend": "transformers", "max_new_tokens": 8}},
        {"name": "qwen2.5-vl-3b", "vlm": {"model_id": "Qwen/Qwen2.5-VL-3B-Instruct", "backend": "transformers", "max_new_tokens": 8}},
    ]},
    "tiny": {"judges": [
        {"name": "tiny-qwen2-vl", "vlm": {"model_id": "tiny://qwen2_vl", "backend": "transformers", "max_new_tokens": 12}},
        {"name": "tiny-qwen2.5-vl", "vlm": {"model_id": "tiny://qwen2_5_vl", "backend": "transformers", "max_new_tokens": 12}},
    ], "frame_short_side_px": 64},
}


def judge_prompt(q: Question) -> str:
    return prompt_for(format_question(q.question or "", q.options or []))


# With a judge that can enforce it (in-process, or an endpoint taking response_format json_schema) the answer
# is decoded as {"answer": "<letter>"}; other judges get the plain prompt and reply in free text.
ANSWER_SCHEMA: dict = {
    "title": "JudgeAnswer", "type": "object",
    "properties": {"answer": {"type": "string", "enum": list(LETTERS)}},
    "required": ["answer"], "additionalProperties": False,
}


def judge_letter(text: str | None) -> str | None:
    """The letter of a structured reply ``{"answer": "B"}``, else whatever :func:`extract_letter` reads."""
    if text and text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if isinstance(value, dict) and isinstance(value.get("answer"), str):
            return extract_letter(value["answer"])
    return extract_letter(text)


def verdict_row(q: Question, judge: Judge, text: str | None, error: str | None) -> FilterVerdict:
    base = dict(question_id=q.question_id, clip_id=q.clip_id, row_kind=ROW_VERDICT, judge=judge.name,
                judge_model=judge.vlm.model_id)
    if error is not None:
        return FilterVerdict(**base, status=STATUS_ERROR,
                             error=f"judge {judge.name} on question {q.question_id}: {error}")
    letter = judge_letter(text)
    return FilterVerdict(**base, raw_reply=text, answer_letter=letter, correct=letter == q.answer)


def decide(q: Question, verdicts: list[FilterVerdict], n_judges: int, on_judge_error: str) -> FilterVerdict:
    """Drop exactly when every configured judge answered correctly (9.3)."""
    failed = [v for v in verdicts if v.status != STATUS_OK]
    n_correct = sum(1 for v in verdicts if v.status == STATUS_OK and v.correct)
    base = dict(question_id=q.question_id, clip_id=q.clip_id, row_kind=ROW_DECISION, judge=ALL_JUDGES,
                n_judges=n_judges, n_correct=n_correct)
    if n_correct == n_judges:
        return FilterVerdict(**base, kept=False, status=STATUS_SKIPPED,
                             error=f"answered correctly from the first frame alone by all {n_judges} judges (9.3)")
    if failed and on_judge_error == "error":
        names = ", ".join(v.judge for v in failed)
        return FilterVerdict(**base, kept=None, status=STATUS_ERROR,
                             error=f"question {q.question_id}: judge(s) {names} gave no answer, so the first-frame "
                                   "rule cannot be applied; re-run ffilter when they work (or set "
                                   "ffilter.on_judge_error=keep)")
    return FilterVerdict(**base, kept=True, status=STATUS_OK)


def resize_short_side(image: np.ndarray, short_side: int | None) -> np.ndarray:
    if short_side is None or min(image.shape[:2]) <= short_side:
        return image
    from PIL import Image

    h, w = image.shape[:2]
    s = short_side / min(h, w)
    return np.array(Image.fromarray(image).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR))


def load_first_frame(q: Question, short_side: int | None) -> np.ndarray:
    from experts.video import first_frame

    if q.clip_path:
        return resize_short_side(first_frame(q.clip_path, 0.0), short_side)
    return resize_short_side(first_frame(q.video_path, q.start_s), short_side)


def filter_questions(questions: list[Question], judges: dict[str, Any], cfg: FfilterConfig, frame_of) -> list[FilterVerdict]:
    """All verdict and decision rows, in the order of ``questions``. ``judges`` maps judge name -> loaded Vlm;
    ``frame_of(question)`` gives the clip's first frame (called once per clip, on a prefetch thread).

    Clips go to the judges a model batch at a time (the largest judge batch, in questions): every judge answers
    the batch's questions in one ``generate`` call while the next clips' first frames are decoded, so memory
    holds one batch of frames, not the shard's. An unreadable clip fails its own questions only."""
    from stages.shared.prefetch import model_batch_size, prefetched

    by_clip: dict[str, list[Question]] = {}
    for q in questions:
        by_clip.setdefault(q.clip_id, []).append(q)
    size = max(model_batch_size(j.vlm) for j in cfg.judges)
    depth = size if cfg.prefetch_depth is None else cfg.prefetch_depth
    rows_of: dict[str, list[FilterVerdict]] = {}
    pending: list[tuple[list[Question], np.ndarray]] = []

    def flush() -> None:
        _judge_batch(pending, judges, cfg, rows_of)
        pending.clear()

    for qs, frame in prefetched(list(by_clip.values()), lambda qs: frame_of(qs[0]), depth=depth):
        if isinstance(frame, Exception):
            for q in qs:
                rows_of[q.question_id] = [FilterVerdict(
                    question_id=q.question_id, clip_id=q.clip_id, row_kind=ROW_DECISION, judge=ALL_JUDGES,
                    n_judges=len(cfg.judges), status=STATUS_ERROR,
                    error=f"cannot read the first frame of clip {q.clip_id} ({q.clip_path or q.video_path} at "
                          f"{q.start_s:.2f} s): {type(frame).__name__}: {frame}")]
            continue
        pending.append((qs, frame))
        if sum(len(x) for x, _ in pending) >= size:
            flush()
    if pending:
        flush()
    return [row for q in questions for row in rows_of.pop(q.question_id, [])]


def _judge_batch(pending: list[tuple[list[Question], np.ndarray]], judges: dict[str, Any], cfg: FfilterConfig,
                 rows_of: dict[str, list[FilterVerdict]]) -> None:
    """Every judge on the questions of ``pending`` (clips with their first frames): verdicts, then decisions."""
    from experts.vlm import VlmRequest

    answerable = [(q, frame) for qs, frame in pending for q in qs]
    verdicts: dict[str, list[FilterVerdict]] = {q.question_id: [] for q, _ in answerable}
    for judge in cfg.judges:
        schema = ANSWER_SCHEMA if judge.vlm.enforces_json_schema else None
        reqs = [VlmRequest(text=judge_prompt(q), images=(frame,), max_new_tokens=judge.vlm.max_new_tokens,
                           temperature=0.0, json_schema=schema) for q, frame in answerable]
        responses = judges[judge.name].generate(reqs) if reqs else []
        for (q, _), r in zip(answerable, responses):
            verdicts[q.question_id].append(verdict_row(q, judge, r.text, r.error))
    for q, _ in answerable:
        rows_of[q.question_id] = verdicts[q.question_id] + [
            decide(q, verdicts[q.question_id], len(cfg.judges), cfg.on_judge_error)]


def process(ctx: ShardContext) -> list[FilterVerdict]:
    from experts.vlm import load_vlm

    cfg: FfilterConfig = ctx.config
    questions = ctx.read_records("qgen", Question)
    if not questions:
        return []
    judges = {j.name: ctx.chat_expert(f"ffilter.judge.{j.name}", j.vlm, load_vlm)
              for j in cfg.judges}
    rows = filter_questions(questions, judges, cfg, lambda q: load_first_frame(q, cfg.frame_short_side_px))
    ctx.progress(len(questions), len(questions))
    return rows


STAGE = Stage(
    name="ffilter", schema=SCHEMA, inputs=("qgen",), config_cls=FfilterConfig, process=process,
    expert=lambda cfg: ("+".join(chat_expert_name("vlm", j.vlm) for j in cfg.judges), None),
    resources=Resources(cpus=1, gpus=1.0), branch="motionbench",
    resources_fn=lambda cfg: chat_resources(Resources(cpus=1, gpus=1.0), *(j.vlm for j in cfg.judges)),
    description="first-frame filter: drop questions every image VLM answers from the first frame (9.3)",
)
