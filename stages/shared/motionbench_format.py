"""The MotionBench release format: categories, answer letters, the question text with its four option lines,
the evaluation prompt, and reading the answer letter out of a model's reply.

Shared by the MotionBench stages (first-frame judges, review, finalize), the synthetic question builder and
evaluation, so a question is posed, exported and scored the same way everywhere.
"""
from __future__ import annotations

import re
from typing import Sequence

LETTERS = ("A", "B", "C", "D")
CATEGORY_NAMES: dict[str, str] = {
    "MR": "Motion Recognition",
    "LM": "Location-related Motion",
    "AO": "Action Order",
    "RC": "Repetition Count",
    "MO": "Motion-related Objects",
    "CM": "Camera Motion",
}
NAME_TO_CODE = {v.lower(): k for k, v in CATEGORY_NAMES.items()}
ANSWER_INSTRUCTION = "Answer with the option's letter from the given choices directly."
NA = "NA"


# -- the question text with embedded options ----------------------------------------------------------------
def format_question(question: str, options: Sequence[str]) -> str:
    """The released format: the stem, then one line per option ``A. text`` .. ``D. text``."""
    if len(options) != 4:
        raise ValueError(f"a MotionBench question has four options, got {len(options)}: {list(options)}")
    stem = " ".join(question.split())
    return "\n".join([stem, *(f"{l}. {' '.join(str(o).split())}" for l, o in zip(LETTERS, options))])


_OPTION_LINE = re.compile(r"^\s*\(?([A-Da-d])[.)]\s*(.*)$")


def parse_question(text: str) -> tuple[str, list[str]]:
    """Inverse of :func:`format_question`: (stem, [A, B, C, D] texts). Raises when the options are not
    exactly the lines ``A.`` to ``D.`` in order."""
    lines = [ln for ln in text.split("\n") if ln.strip()]
    opts: list[tuple[str, str]] = []
    stem_lines: list[str] = []
    for ln in lines:
        m = _OPTION_LINE.match(ln)
        if m and (opts or len(stem_lines) > 0) and len(opts) < 4 and m.group(1).upper() == LETTERS[len(opts)]:
            opts.append((m.group(1).upper(), m.group(2).strip()))
        elif opts:
            raise ValueError(f"text after the options in question {text[:80]!r}")
        else:
            stem_lines.append(ln.strip())
    if [l for l, _ in opts] != list(LETTERS):
        raise ValueError(f"question {text[:80]!r} does not end with option lines A. to D.")
    return " ".join(stem_lines), [t for _, t in opts]


def prompt_for(question_with_options: str) -> str:
    """The evaluation prompt: question + options + the instruction to answer with a letter."""
    return f"{question_with_options}\n{ANSWER_INSTRUCTION}"


# -- answer-letter extraction --------------------------------------------------------------------------------
_PATTERNS = (
    re.compile(r"^\s*\(?([A-D])\)?\s*[.:)]?\s*$", re.I),  # "B", "b", "(B)", "B.", "B)"
    re.compile(r"^\s*\(([A-D])\)", re.I),  # "(B) text"
    re.compile(r"^\s*([A-D])\s*[.):](?:\s|$)", re.I),  # "B. text", "B) text", "B: text"
    re.compile(r"^\s*([A-D])\s*$", re.I),
)
_CUE = re.compile(
    r"(?:answer|option|choice)\s*(?:is|would be|:|=|-)?\s*(?:option\s*)?[\"'(\[]?\s*([A-D])\b(?![''-])", re.I)
_A_AS_LETTER = re.compile(r"\s*(?:$|[.,;:)!?]|or\b|and\b)")
_STANDALONE = re.compile(r"(?<![A-Za-z'’])\(?([A-D])\)?(?![A-Za-z'’])")


def extract_letter(reply: str | None) -> str | None:
    """The option letter a reply names, or None when it names none or several.

    Accepted: ``B``, ``b``, ``(B) text``, ``B.``, ``B) text``, ``B. text``, ``Answer: B``, ``The answer is B.``,
    ``The correct option is (B)``. A bare lower-case letter inside a sentence is not taken as an answer
    (``a`` is an article), nor is a capital ``A`` followed by a word other than "or" / "and".
    """
    if reply is None:
        return None
    text = reply.strip()
    if not text:
        return None
    for p in _PATTERNS:
        m = p.match(text)
        if m:
            return m.group(1).upper()
    cues = {m.group(1).upper() for m in _CUE.finditer(text)}
    if len(cues) == 1:
        return cues.pop()
    if len(cues) > 1:
        return None
    # Fall back to standalone capital letters B-D (and A only in brackets / before a period or parenthesis),
    # accepted only when exactly one distinct letter appears.
    found = set()
    for m in _STANDALONE.finditer(text):
        letter = m.group(1)
        if letter.islower():
            continue
        if letter == "A" and not (m.group(0).startswith("(") or _A_AS_LETTER.match(text[m.end():])):
            continue  # "A man walks": the article, not the option
        found.add(letter)
    return found.pop() if len(found) == 1 else None
