"""Drop and error reasons grouped by cause (used by the runner's shard markers, `status` and the report).

Stages write messages that name the item they failed on ("qgen for clip 3f2a...: reply is not valid JSON
(Expecting value: line 1 column 1)"). Counted verbatim, every clip is its own reason and the cause is
hidden; here ids, paths, quoted values and numbers become placeholders and leading "which item" clauses (naming an id) are dropped, so
identical causes fall into one group.
"""
from __future__ import annotations

import collections
import re
from typing import Iterable

_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)
_HEX = re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b", re.I)
_URI = re.compile(r"(?:[a-z][a-z0-9+.-]*://|(?<![\w.])/)[^\s'\",;:()]+", re.I)
_QUOTED = re.compile(r"'[^'\n]{1,80}'|\"[^\"\n]{1,80}\"")
_NUM = re.compile(r"(?<![\w.<])\d+(?:\.\d+)?(?![\d.])")
# a leading clause that only says which item failed: "qgen for clip <id>: ", "clip <id>, question <n>: "
_CONTEXT = re.compile(r"^[^:]{0,80}?<id>[^:]{0,40}?:\s+")


def normalise_reason(message: str | None) -> str:
    """The cause of an error message with item names removed (``"(no reason)"`` for an empty one)."""
    text = " ".join((message or "").split())
    if not text:
        return "(no reason)"
    text = _QUOTED.sub("<text>", text)  # names and values in quotes (a tag, a phrase) vary, the cause does not
    text = _UUID.sub("<id>", text)
    text = _URI.sub("<path>", text)
    text = _HEX.sub("<id>", text)
    text = _NUM.sub("<n>", text)
    while True:
        m = _CONTEXT.match(text)
        if not m or m.end() >= len(text):
            break
        text = text[m.end():]
    return text[:200]


def group_reasons(messages: Iterable[str | None], top: int = 10) -> list[dict]:
    """``[{"reason", "count", "example"}]``, most frequent cause first; ``example`` is one original message."""
    return group_reason_counts(((m, 1) for m in messages), top)


def group_reason_counts(counted: Iterable[tuple[str | None, int]], top: int = 10) -> list[dict]:
    """:func:`group_reasons` over ``(message, times)`` pairs: each distinct message is normalised once, however
    many rows carry it (readers of large stages count a shard's messages first)."""
    counts: collections.Counter = collections.Counter()
    example: dict[str, str] = {}
    for m, n in counted:
        key = normalise_reason(m)
        counts[key] += n
        example.setdefault(key, " ".join((m or "").split())[:300])
    return [{"reason": k, "count": n, "example": example[k]} for k, n in counts.most_common(top)]
