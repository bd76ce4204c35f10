"""MotionBench evaluation: the released meta format, answer-letter extraction, scoring, and model runs.

Pure logic; the CLI (``motionforge eval score|run``) lives in :mod:`flows.cli_motionbench`.

The released ``video_info.meta.jsonl`` has one JSON object per video::

    {"key": ..., "video_path": ..., "video_type": ..., "question_type": ...,
     "qa": [{"uid": ..., "question": "<stem>\\nA. ...\\nB. ...\\nC. ...\\nD. ...", "answer": "B" | "NA"}]}

Our export (:mod:`stages.export.motionbench`) writes one question per line, so the line's ``question_type``
is that question's category; :func:`qa_category` also reads a per-qa ``question_type`` (older exports) and
falls back to the line's. The released scorer wraps the line-level ``question_type`` in a list once per
answered qa, so it crashes on a line with two answered questions; :func:`score` handles any number of
questions per line, never mutates its input, and does not score ``NA`` answers unless an answer key
supplies them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from stages.shared.motionbench_format import CATEGORY_NAMES, LETTERS, NA, extract_letter, prompt_for

# -- meta files ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MetaQuestion:
    uid: str
    key: str
    video_path: str
    video_type: str | None
    category: str | None  # full name
    question: str  # with embedded options
    answer: str  # letter or NA
    start_s: float | None = None
    end_s: float | None = None


def qa_category(video: Mapping[str, Any], qa: Mapping[str, Any]) -> str | None:
    """The qa's category full name: its own ``question_type`` if present, else the video's (a string, or a
    one-element list as some copies of the release have)."""
    for v in (qa.get("question_type"), video.get("question_type")):
        if isinstance(v, list):
            v = v[0] if len(v) == 1 else None
        if isinstance(v, str) and v:
            return CATEGORY_NAMES.get(v, v)
    return None


def read_meta(path: str | Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {n} is not JSON ({exc.msg}); each line must be one video object") from exc
            for field in ("key", "qa"):
                if field not in obj:
                    raise ValueError(f"{path}: line {n} has no {field!r} field (video_info.meta.jsonl format)")
            out.append(obj)
    return out


def meta_questions(videos: Iterable[Mapping[str, Any]]) -> list[MetaQuestion]:
    out = []
    seen: set[str] = set()
    for v in videos:
        for qa in v["qa"]:
            uid = str(qa["uid"])
            if uid in seen:
                raise ValueError(f"uid {uid} appears twice in the meta file (video {v['key']})")
            seen.add(uid)
            out.append(MetaQuestion(uid=uid, key=str(v["key"]), video_path=str(v.get("video_path", "")),
                                    video_type=v.get("video_type"), category=qa_category(v, qa),
                                    question=qa["question"], answer=str(qa.get("answer", NA)).strip().upper() or NA,
                                    start_s=v.get("start_s"), end_s=v.get("end_s")))
    return out


def read_answer_key(path: str | Path) -> dict[str, str]:
    """An answer key: JSON ``{uid: letter}`` or JSONL lines ``{"uid": ..., "answer": ...}``."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        obj = json.loads(text)
        if isinstance(obj, dict):
            return {str(k): str(v).strip().upper() for k, v in obj.items()}
    except json.JSONDecodeError:
        pass
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if "uid" not in row or "answer" not in row:
                raise ValueError(f"{path}: line {n} needs 'uid' and 'answer'")
            out[str(row["uid"])] = str(row["answer"]).strip().upper()
    return out


# -- scoring -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Score:
    per_category: dict[str, float | None]  # full name -> accuracy (None: no scored question)
    per_category_counts: dict[str, tuple[int, int]]  # full name -> (correct, scored)
    overall: float | None
    scored: int
    correct: int
    unanswered: int  # scored questions whose reply named no single option (or had no reply)
    missing: int  # scored questions absent from the responses (counted wrong, and in unanswered)
    not_scored: int  # NA answers without a key

    def as_dict(self) -> dict[str, Any]:
        return {
            "per_category": self.per_category,
            "per_category_counts": {k: {"correct": c, "scored": n} for k, (c, n) in self.per_category_counts.items()},
            "overall": self.overall, "scored": self.scored, "correct": self.correct,
            "unanswered": self.unanswered, "missing": self.missing, "not_scored": self.not_scored,
        }


def score(questions: Sequence[MetaQuestion], responses: Mapping[str, Any],
          answer_key: Mapping[str, str] | None = None) -> Score:
    """Accuracy per category (full names), overall, and counts. ``responses`` maps uid -> raw reply."""
    key = dict(answer_key or {})
    counts: dict[str, list[int]] = {name: [0, 0] for name in CATEGORY_NAMES.values()}
    scored = correct = unanswered = missing = not_scored = 0
    for q in questions:
        truth = key.get(q.uid, q.answer)
        if truth == NA or truth not in LETTERS:
            not_scored += 1
            continue
        scored += 1
        cat = q.category or "Unknown"
        counts.setdefault(cat, [0, 0])[1] += 1
        if q.uid not in responses:
            missing += 1
            unanswered += 1
            continue
        raw = responses[q.uid]
        letter = extract_letter(raw if isinstance(raw, str) else (None if raw is None else str(raw)))
        if letter is None:
            unanswered += 1
        elif letter == truth:
            correct += 1
            counts[cat][0] += 1
    per = {k: (c / n if n else None) for k, (c, n) in counts.items()}
    return Score(per_category=per, per_category_counts={k: (c, n) for k, (c, n) in counts.items()},
                 overall=(correct / scored if scored else None), scored=scored, correct=correct,
                 unanswered=unanswered, missing=missing, not_scored=not_scored)


# -- running a model -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EvalInput:
    """What one evaluation request shows the model; built by :func:`build_inputs`, sent by the caller."""

    uid: str
    prompt: str
    video_path: str | None  # None for text-only
    start_s: float | None
    end_s: float | None


def resolve_video(video_path: str, videos_dir: str | Path | None) -> str:
    """A meta ``video_path`` is used as is when it exists, else relative to ``videos_dir``, else by name."""
    p = Path(video_path)
    if p.is_absolute() and p.exists():
        return str(p)
    if videos_dir is not None:
        for cand in (Path(videos_dir) / video_path, Path(videos_dir) / p.name):
            if cand.exists():
                return str(cand)
    if p.exists():
        return str(p.resolve())
    raise FileNotFoundError(f"video {video_path!r} not found (looked in {videos_dir or 'the current folder'}); "
                            "pass --videos DIR with the benchmark's videos")


def build_inputs(questions: Sequence[MetaQuestion], videos_dir: str | Path | None, text_only: bool = False) -> list[EvalInput]:
    out = []
    for q in questions:
        out.append(EvalInput(uid=q.uid, prompt=prompt_for(q.question),
                             video_path=None if text_only else q.video_path, start_s=q.start_s, end_s=q.end_s))
    return out


def run_model(inputs: Sequence[EvalInput], vlm: Any, load_frames: Callable[[EvalInput], list],
              as_video: bool = True, batch_size: int = 8,
              progress: Callable[[int, int], None] = lambda d, t: None) -> tuple[dict[str, str | None], dict[str, str]]:
    """Ask ``vlm`` (an :class:`experts.vlm.Vlm`) every question; returns (uid -> raw reply, uid -> error).
    A failed request has reply None, which scoring counts as unanswered. ``load_frames(input)`` gives the frames (empty for text-only); a
    video that cannot be read is an unanswered question, not a crash."""
    from experts.vlm import VlmRequest

    replies: dict[str, str | None] = {}
    errors: dict[str, str] = {}
    for i in range(0, len(inputs), batch_size):
        chunk = inputs[i:i + batch_size]
        reqs, uids = [], []
        for inp in chunk:
            try:
                frames = tuple(load_frames(inp)) if inp.video_path is not None else ()
            except Exception as exc:  # noqa: BLE001 -- one unreadable video is one unanswered question
                replies[inp.uid] = None
                errors[inp.uid] = f"{type(exc).__name__}: {exc}"
                continue
            reqs.append(VlmRequest(text=inp.prompt, images=frames, as_video=as_video and len(frames) > 1,
                                   max_new_tokens=16, temperature=0.0))
            uids.append(inp.uid)
        for uid, resp in zip(uids, vlm.generate(reqs)):
            replies[uid] = resp.text if resp.error is None else None
            if resp.error is not None:
                errors[uid] = resp.error
        progress(min(i + batch_size, len(inputs)), len(inputs))
    return replies, errors
