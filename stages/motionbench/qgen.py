"""qgen: an LLM writes about six four-option questions per clip description (MotionBench 3.1, appendix 9.2).

The prompt is a versioned package data file (``stages/data/motionbench/qgen_prompt.v1.txt``, written after
9.2's structure: design rules incl. the ambiguity rules, content dimension x question-logic dimension, JSON
reply). Its version (file name + content digest) is stored in every row's ``prompt_version``.

Validation (:func:`validate_question`, :func:`parse_reply`): exactly four distinct non-empty options, one
answer among them (a letter, or the exact text of one option), a known content dimension and logic dimension,
no wording that reveals a written description ("based on the description", "according to the caption"...),
no duplicate question for the clip. The same rules are the pydantic model handed to ``Llm.generate_json``, so
an invalid reply is re-asked with the reason (bounded by ``repair_retries``). What is still invalid after
that becomes error rows that carry the reason; valid questions from a partly invalid final reply are kept.

Category map (documented choice; 9.2 generates dimensions, the benchmark reports six categories, 3.1).
The first rule that matches wins:

==========================================================  ========================================
generated dimensions                                        MotionBench category
==========================================================  ========================================
content 4.1 (camera movement), any logic                    CM  Camera Motion
logic 2 (movement count)                                    RC  Repetition Count
logic 3 (sequence between movements)                        AO  Action Order
content 1.4 / 3.2 (position changes) or 2.1 (trajectory)    LM  Location-related Motion
content 2.2 (object state changes) or 5.x (appearance)      MO  Motion-related Objects
anything else (1.1, 1.2, 1.3, 3.1 with logic 1 or 4)        MR  Motion Recognition
==========================================================  ========================================

The primary (first) content dimension decides, except that camera movement anywhere makes it CM.
"""
from __future__ import annotations

import hashlib
import logging
import re
from functools import lru_cache
from typing import Any

from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator

from experts.llm import LlmSpec
from experts.structured import one_line_text_pattern
from schemas._base import STATUS_ERROR
from schemas.descriptions import Description
from schemas.questions import SCHEMA, Question
from stages.shared.prompts import DATA_DIR as SHARED_DATA_DIR
from stages.base import Resources, ShardContext, Stage, StageConfig, chat_expert_name, chat_resources
from stages.shared.motionbench_questions import failure_id, leaked_phrase, normalise, question_id

log = logging.getLogger(__name__)
DATA_DIR = SHARED_DATA_DIR / "motionbench"
LETTERS = ("A", "B", "C", "D")
CONTENT_DIMENSIONS: dict[str, str] = {
    "1.1": "human: detailed actions", "1.2": "human: interaction among people", "1.3": "human: emotional states",
    "1.4": "human: position and its changes", "2.1": "object: movement trajectory", "2.2": "object: state changes",
    "3.1": "animal: detailed actions", "3.2": "animal: position and its changes", "4.1": "camera movement",
    "5.1": "appearance: individuals", "5.2": "appearance: objects", "5.3": "appearance: environment",
}
LOGIC_DIMENSIONS: dict[int, str] = {1: "whether a movement occurs", 2: "movement count",
                                    3: "sequence between movements", 4: "appearance description and judgment"}



class QgenConfig(StageConfig):
    llm: LlmSpec = LlmSpec(model_id="gpt-4o", backend="openai", max_new_tokens=2048, temperature=0.0)
    num_questions: int = Field(6, ge=1, le=20)  # 9.2 guideline 8: "around six"
    prompt_file: str = "qgen_prompt.v1.txt"
    repair_retries: int = Field(2, ge=0, le=5)
    # When the backend enforces a JSON schema while decoding (in-process xgrammar, or an endpoint taking
    # response_format json_schema): the longest question / option / explanation text it may write, in characters.
    decode_max_chars: int = Field(300, ge=8, le=4000)


PROFILES = {
    "small": {"llm": {"model_id": "Qwen/Qwen2.5-7B-Instruct", "backend": "transformers", "max_new_tokens": 2048}},
    # Short texts and one question: under constrained decoding the random model then finishes a valid reply.
    "tiny": {"llm": {"model_id": "tiny://qwen2_lm", "backend": "transformers", "max_new_tokens": 384},
             "num_questions": 1, "decode_max_chars": 16},
}


# -- the prompt ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def load_prompt(name: str) -> tuple[str, str]:
    """(template, version) of a prompt file in ``stages/data/motionbench``; ``#`` lines are comments."""
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} not found; prompt files available: "
                                f"{sorted(p.name for p in DATA_DIR.glob('*.txt'))}")
    raw = path.read_text(encoding="utf-8")
    template = "\n".join(ln for ln in raw.splitlines() if not ln.startswith("#")).strip() + "\n"
    stem = name.rsplit(".", 1)[0]
    return template, f"{stem}@{hashlib.sha256(raw.encode()).hexdigest()[:8]}"


def render_prompt(template: str, first_frame_description: str | None, dynamic_description: str, num_questions: int) -> str:
    return template.format(first_frame_description=(first_frame_description or "(not given)").strip(),
                           dynamic_description=dynamic_description.strip(), num_questions=num_questions)


# -- validation ----------------------------------------------------------------------------------------------
_LETTER_PREFIX = re.compile(r"^\s*(?:\(([A-Da-d])\)|([A-Da-d])[.):])\s+")


def _strip_letter_prefixes(options: list[str]) -> list[str]:
    """Drop "A. " .. "D. " prefixes, but only when all four options carry them in order."""
    ms = [_LETTER_PREFIX.match(o) for o in options]
    if len(options) == 4 and all(ms) and [((m.group(1) or m.group(2)).upper()) for m in ms] == list(LETTERS):
        return [o[m.end():] for o, m in zip(options, ms)]
    return options


def category_for(content_dimensions: list[str], logic_dimension: int) -> str:
    """The MotionBench category of a generated question (table in the module docstring)."""
    primary = content_dimensions[0]
    if "4.1" in content_dimensions:
        return "CM"
    if logic_dimension == 2:
        return "RC"
    if logic_dimension == 3:
        return "AO"
    if primary in ("1.4", "3.2", "2.1"):
        return "LM"
    if primary == "2.2" or primary.startswith("5."):
        return "MO"
    return "MR"


class GeneratedQuestion(BaseModel):
    """One single-choice question: four different option texts (no letters), the answer letter A-D, content
    dimension codes such as "1.1" and a question-logic dimension 1-4."""

    question: str
    options: list[str]
    answer: str
    content_dimensions: list[str] = Field(validation_alias=AliasChoices("content_dimensions", "content_dimension"))
    logic_dimension: int = Field(validation_alias=AliasChoices("logic_dimension", "question_logic_dimension"))
    explanation: str | None = None

    @field_validator("content_dimensions", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        if isinstance(v, (str, int, float)):
            v = [v]
        return [str(x).strip() for x in v] if isinstance(v, list) else v

    @field_validator("logic_dimension", mode="before")
    @classmethod
    def _logic_code(cls, v: Any) -> Any:
        if isinstance(v, str) and re.match(r"^\s*\d", v):
            return int(re.match(r"^\s*(\d+)", v).group(1))
        return v

    @model_validator(mode="after")
    def _rules(self) -> "GeneratedQuestion":
        q = " ".join(self.question.split())
        if not q:
            raise ValueError("the question text is empty")
        opts = [" ".join(str(o).split()) for o in _strip_letter_prefixes(list(self.options))]
        if len(opts) != 4:
            raise ValueError(f"question {q!r} has {len(opts)} options; it needs exactly 4")
        if any(not o for o in opts):
            raise ValueError(f"question {q!r} has an empty option")
        if len({normalise(o) for o in opts}) != 4:
            raise ValueError(f"question {q!r} repeats an option ({opts}); the four options must differ")
        ans = self.answer.strip()
        m = re.match(r"^\(?([A-Da-d])\)?[.):]?$", ans) or re.match(r"^(?:option\s+)([A-Da-d])\b", ans, re.I)
        if m:
            letter = m.group(1).upper()
        else:
            hits = [i for i, o in enumerate(opts) if normalise(o) == normalise(ans)]
            if len(hits) != 1:
                raise ValueError(f"question {q!r}: answer {self.answer!r} is not one of the options' letters A-D "
                                 "nor the exact text of one option")
            letter = LETTERS[hits[0]]
        if not self.content_dimensions or any(c not in CONTENT_DIMENSIONS for c in self.content_dimensions):
            raise ValueError(f"question {q!r}: content_dimensions {self.content_dimensions} must be codes from "
                             f"{sorted(CONTENT_DIMENSIONS)}")
        if self.logic_dimension not in LOGIC_DIMENSIONS:
            raise ValueError(f"question {q!r}: logic_dimension {self.logic_dimension} must be one of 1, 2, 3, 4")
        for where, text in (("question", q), *((f"option {l}", o) for l, o in zip(LETTERS, opts)),
                            ("explanation", self.explanation or "")):
            leak = leaked_phrase(text)
            if leak:
                raise ValueError(f"question {q!r}: the {where} says {leak!r}, which gives away that a written text "
                                 "was used; write as someone watching the video")
        object.__setattr__(self, "question", q)
        object.__setattr__(self, "options", opts)
        object.__setattr__(self, "answer", letter)
        return self

    @property
    def category(self) -> str:
        return category_for(self.content_dimensions, self.logic_dimension)


class GeneratedQuestions(BaseModel):
    """About six questions about the video's motion (its JSON schema is shown to the LLM)."""

    questions: list[GeneratedQuestion] = Field(min_length=1)

    @model_validator(mode="after")
    def _no_duplicates(self) -> "GeneratedQuestions":
        seen: dict[str, int] = {}
        for i, q in enumerate(self.questions):
            k = normalise(q.question)
            if k in seen:
                raise ValueError(f"questions {seen[k] + 1} and {i + 1} are the same question ({q.question!r}); "
                                 "every question must be different")
            seen[k] = i
        return self


def decoding_schema(num_questions: int, max_chars: int) -> dict:
    """The JSON schema a reply is decoded against when the backend enforces one: :class:`GeneratedQuestions`'
    schema, tightened to what the rules accept (four options, the letter, known dimension codes), with bounded
    texts and at most twice ``num_questions`` questions ("about" that many, 9.2 guideline 8). Validation stays
    the lenient pydantic rules, which also accept e.g. an answer written as the option's text."""
    schema = GeneratedQuestions.model_json_schema()
    q = schema["$defs"]["GeneratedQuestion"]["properties"]
    # A pattern rather than min/maxLength (xgrammar takes one or the other): starts with a non-blank character,
    # at most max_chars characters, no line breaks (spelled by one_line_text_pattern so that vLLM's xgrammar takes it).
    text = {"type": "string", "pattern": one_line_text_pattern(max_chars)}
    q["question"].update(text)
    q["options"].update(minItems=4, maxItems=4, items=dict(text))
    q["answer"].update(enum=list(LETTERS))
    q["content_dimensions"].update(minItems=1, maxItems=3, items={"type": "string", "enum": list(CONTENT_DIMENSIONS)})
    q["logic_dimension"].update(enum=list(LOGIC_DIMENSIONS))
    q["explanation"]["anyOf"] = [dict(text), {"type": "null"}]
    schema["properties"]["questions"].update(maxItems=max(2 * num_questions, 1))
    return schema


class InvalidQuestion(BaseModel):
    index: int
    reason: str
    question: str | None = None


def _reply_items(text: str) -> list[Any]:
    from experts.llm import extract_json

    try:
        obj = extract_json(text)
    except Exception as exc:  # noqa: BLE001 -- any parse failure means "not JSON"
        raise ValueError(f"the reply is not valid JSON ({exc})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("questions"), list):
        return obj["questions"]
    if isinstance(obj, list):  # 9.2's original format: a bare list of question objects
        return obj
    raise ValueError('the reply is JSON but not {"questions": [...]} nor a list of questions')


def parse_reply(text: str) -> list[GeneratedQuestion | InvalidQuestion]:
    """Validate each question of a raw reply on its own; raises ValueError when the reply is not JSON at all.
    Later duplicates of an earlier question are invalid."""
    from pydantic import ValidationError

    items = _reply_items(text)
    if not items:
        raise ValueError("the reply holds no questions")
    out: list[GeneratedQuestion | InvalidQuestion] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        qtext = item.get("question") if isinstance(item, dict) and isinstance(item.get("question"), str) else None
        if not isinstance(item, dict):
            out.append(InvalidQuestion(index=i, reason=f"question {i + 1} is not a JSON object"))
            continue
        try:
            q = GeneratedQuestion.model_validate(item)
        except ValidationError as exc:
            reasons = "; ".join(e["msg"].removeprefix("Value error, ") + (f" (field {'.'.join(map(str, e['loc']))})" if e["loc"] else "")
                                for e in exc.errors())
            out.append(InvalidQuestion(index=i, reason=reasons, question=qtext))
            continue
        k = normalise(q.question)
        if k in seen:
            out.append(InvalidQuestion(index=i, reason=f"duplicate of an earlier question for this clip: {q.question!r}",
                                       question=q.question))
            continue
        seen.add(k)
        out.append(q)
    return out


def validate_question(item: dict) -> GeneratedQuestion:
    """One question dict -> validated question; ValueError naming the broken rule otherwise."""
    from pydantic import ValidationError

    try:
        return GeneratedQuestion.model_validate(item)
    except ValidationError as exc:
        raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from exc


# -- rows ----------------------------------------------------------------------------------------------------
def _base(d: Description, prompt_version: str, attempts: int | None) -> dict:
    return dict(clip_id=d.clip_id, video_id=d.video_id, video_path=d.video_path, clip_path=d.clip_path,
                start_s=d.start_s, end_s=d.end_s, source="generated", prompt_version=prompt_version, attempts=attempts)


def rows_for_reply(d: Description, value: GeneratedQuestions | None, raw: str | None, error: str | None,
                   attempts: int, prompt_version: str) -> list[Question]:
    """Turn one generate_json result into question rows (ok rows, and error rows with their reasons)."""
    base = _base(d, prompt_version, attempts)
    if value is not None:
        parsed: list[GeneratedQuestion | InvalidQuestion] = list(value.questions)
    elif raw is None:
        return [Question(question_id=failure_id(d.clip_id, "request"), **base, status=STATUS_ERROR,
                         error=f"qgen for clip {d.clip_id}: {error}; re-run qgen when the LLM endpoint works")]
    else:
        try:
            parsed = parse_reply(raw)
        except ValueError as exc:
            return [Question(question_id=failure_id(d.clip_id, "reply"), **base, raw=raw[:20000], status=STATUS_ERROR,
                             error=f"qgen for clip {d.clip_id}: {exc} after {attempts} attempt(s); "
                                   f"check the LLM or raise qgen.repair_retries")]
    rows = []
    for i, q in enumerate(parsed):
        if isinstance(q, InvalidQuestion):
            rows.append(Question(question_id=failure_id(d.clip_id, f"invalid#{i}"), **base, question=q.question,
                                 generation_index=i, raw=raw[:20000] if raw else None, status=STATUS_ERROR,
                                 error=f"qgen for clip {d.clip_id}, question {i + 1}: {q.reason} "
                                       f"(still invalid after {attempts} attempt(s))"))
            continue
        rows.append(Question(question_id=question_id(d.clip_id, q.question), **base, question=q.question,
                             options=list(q.options), answer=q.answer, category=q.category,
                             content_dimensions=list(q.content_dimensions), logic_dimension=q.logic_dimension,
                             generation_index=i))
    return rows


def process(ctx: ShardContext) -> list[Question]:
    from experts.llm import LlmRequest, load_llm

    cfg: QgenConfig = ctx.config
    descriptions = [d for d in ctx.read_records("describe", Description) if d.dynamic_description]
    if not descriptions:
        return []
    template, version = load_prompt(cfg.prompt_file)
    llm = ctx.chat_expert("qgen.llm", cfg.llm, load_llm)
    # Endpoints that cannot enforce a schema get the model's plain schema in the prompt, as before (same
    # requests, so the response cache still answers them).
    schema = decoding_schema(cfg.num_questions, cfg.decode_max_chars) if cfg.llm.enforces_json_schema else None
    requests = [LlmRequest(prompt=render_prompt(template, d.first_frame_description, d.dynamic_description,
                                                cfg.num_questions), json_schema=schema) for d in descriptions]
    results = llm.generate_json(requests, GeneratedQuestions, repair_retries=cfg.repair_retries)
    rows: list[Question] = []
    for i, (d, r) in enumerate(zip(descriptions, results)):
        rows += rows_for_reply(d, r.value, r.raw, r.error, r.attempts, version)
        ctx.progress(i + 1, len(descriptions))
    reasks = sum(r.attempts - 1 for r in results if r.attempts > 1)
    log.info("qgen shard %d: %d replies, %d repair re-ask(s) (schema enforced while decoding: %s)",
             ctx.shard, len(results), reasks, schema is not None)
    return rows


STAGE = Stage(
    name="qgen", schema=SCHEMA, inputs=("describe",), config_cls=QgenConfig, process=process,
    expert=lambda cfg: (chat_expert_name("llm", cfg.llm), cfg.llm.revision), resources=Resources(cpus=1, gpus=1.0),
    branch="motionbench",
    resources_fn=lambda cfg: chat_resources(Resources(cpus=1, gpus=1.0), cfg.llm),
    description="LLM question generation from dynamic descriptions (MotionBench 9.2)",
)
