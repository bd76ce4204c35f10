"""Rules every MotionBench question obeys, whoever writes it (the LLM in qgen, a reviewer's edit, or the
ground-truth builder for synthetic videos): stable ids, text normalisation, the leaked-source check."""
from __future__ import annotations

import re
import uuid

CATEGORIES = ("MR", "LM", "AO", "RC", "MO", "CM")

# 9.2 guideline 6: a question must read as if the asker watched the video. These give the text source away.
LEAK_PATTERNS = tuple(re.compile(p, re.I) for p in (
    r"\bdescriptions?\b", r"\bcaptions?\b", r"\bannotations?\b", r"\bnarrat(?:ion|or|ed)\b",
    r"\b(?:the|this|above|given|provided) (?:text|passage|paragraph|summary)\b",
    r"\b(?:as|is|was|were) (?:described|mentioned|stated|noted|written)\b",
    r"\b(?:described|mentioned|stated) (?:above|earlier|in)\b",
))


def normalise(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: two questions that differ only there are duplicates."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def clip_namespace(clip_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(clip_id)
    except ValueError:
        return uuid.uuid5(uuid.NAMESPACE_URL, f"motionforge:clip:{clip_id}")


def question_id(clip_id: str, question: str) -> str:
    """uuid5(clip, normalised question text): stable across re-runs and across option re-ordering."""
    return str(uuid.uuid5(clip_namespace(clip_id), normalise(question)))


def failure_id(clip_id: str, what: str) -> str:
    """Key of an error row that has no usable question text (e.g. the reply was not JSON)."""
    return str(uuid.uuid5(clip_namespace(clip_id), f"\x00{what}"))


def leaked_phrase(text: str) -> str | None:
    for p in LEAK_PATTERNS:
        m = p.search(text)
        if m:
            return m.group(0)
    return None
