"""Drop and error reasons grouped by cause (used by the runner's shard markers, `status` and the report).

Stages write messages that name the item they failed on ("qgen for clip 3f2a...: reply is not valid JSON
(Expecting value: line 1 column 1)"). Counted verbatim, every clip is its own reason and the cause is
hidden; here ids, paths, quoted values and numbers become placeholders and leading "which item" clauses (naming an id) are dropped, so
identical causes fall into one group.
"""
from __future__ import annotations

import collections
import functools
import re
from typing import Iterable

_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)
_HEX = re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b", re.I)
_URI = re.compile(r"(?:[a-z][a-z0-9+.-]*://|(?<![\w.])/)[^\s'\",;:()]+", re.I)
_QUOTED = re.compile(r"'[^'\n]{1,80}'|\"[^\"\n]{1,80}\"")
_NUM = re.compile(r"(?<![\w.<])\d+(?:\.\d+)?(?![\d.])")
# a leading clause that only says which item failed: "qgen for clip <id>: ", "clip <id>, question <n>: "
_CONTEXT = re.compile(r"^[^:]{0,80}?<id>[^:]{0,40}?:\s+")


@functools.lru_cache(maxsize=8192)
def normalise_reason(message: str | None) -> str:
    """The cause of an error message with item names removed (``"(no reason)"`` for an empty one). Kept for
    the last 8,192 messages: the same message comes back on many shards (`status` and the report ask once per
    shard marker or table), and five regular expressions cost about 20 us a message."""
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


def rules_digest() -> str:
    """A name for these rules (their patterns and code), kept by caches of causes (the marker index) so that
    causes found under other rules are found again."""
    import hashlib

    code = normalise_reason.__wrapped__.__code__
    parts = [p.pattern for p in (_UUID, _HEX, _URI, _QUOTED, _NUM, _CONTEXT)] + [code.co_code.hex(), repr(code.co_consts)]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def group_reasons(messages: Iterable[str | None], top: int = 10) -> list[dict]:
    """``[{"reason", "count", "example"}]``, most frequent cause first; ``example`` is one original message."""
    reasons = ReasonCounter()
    for m in messages:
        reasons.add(m)
    return reasons.groups(top)


class ReasonCounter:
    """Rows per cause, added as they are read (a message with how many rows carry it: a reader of a large stage
    counts a shard's messages first): holds the causes and one example of each, not the messages."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.example: dict[str, str] = {}

    def add(self, message: str | None, n: int = 1) -> None:
        key = normalise_reason(message)
        self.counts[key] += n
        self.example.setdefault(key, " ".join((message or "").split())[:300])

    def groups(self, top: int = 10) -> list[dict]:
        """``[{"reason", "count", "example"}]``, most frequent cause first."""
        return [{"reason": k, "count": n, "example": self.example[k]} for k, n in self.counts.most_common(top)]
