"""Relative spatiotemporal position tokens (iMOVE 3.2.2).

A time t in a video of duration T maps to q_t = round(t / T * N_t), N_t = 300; a pixel coordinate maps to
round(x / W * 1000) and round(y / H * 1000). Dequantisation inverts it (q / N * T). Rounding is half-up
and values are clamped to [0, N], so t = T gives N_t and a box touching the right border gives 1000; the
round trip is exact to within half a step (T / (2 N_t) seconds, W / 2000 pixels).

Times are relative to the clip the sample is about (t_rel = t_video - clip_start), since the trainer sees
the clip, not the whole source video. W and H are the displayed frame size (after rotation metadata).
"""
from __future__ import annotations

import math
import re
from typing import Sequence

N_TIME = 300
N_SPACE = 1000


def _q(value: float, extent: float, n: int) -> int:
    if extent <= 0:
        raise ValueError(f"cannot quantise against a non-positive extent {extent}")
    return int(min(n, max(0, math.floor(value / extent * n + 0.5))))


def quantize_time(t_s: float, duration_s: float, n: int = N_TIME) -> int:
    return _q(t_s, duration_s, n)


def dequantize_time(q: int, duration_s: float, n: int = N_TIME) -> float:
    return min(max(q, 0), n) / n * duration_s


def quantize_box(box_xyxy_px: Sequence[float], width: int, height: int, n: int = N_SPACE) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box_xyxy_px
    return (_q(x1, width, n), _q(y1, height, n), _q(x2, width, n), _q(y2, height, n))


def dequantize_box(q: Sequence[int], width: int, height: int, n: int = N_SPACE) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (min(max(v, 0), n) for v in q)
    return (x1 / n * width, y1 / n * height, x2 / n * width, y2 / n * height)


# Text forms used in the instruction data. Tokens are plain numbers, not new tokenizer entries (3.2.2).
def format_time(q: int) -> str:
    return f"<{q}>"


def format_box(q: Sequence[int]) -> str:
    return "[{}, {}, {}, {}]".format(*q)


_TIME_RE = re.compile(r"<\s*(\d{1,4})\s*>")
_BOX_RE = re.compile(r"\[\s*(\d{1,4})\s*,\s*(\d{1,4})\s*,\s*(\d{1,4})\s*,\s*(\d{1,4})\s*\]")


def parse_times(text: str) -> list[int]:
    """Time tokens in a model's answer, in order (for reading predictions back)."""
    return [int(m) for m in _TIME_RE.findall(text)]


def parse_boxes(text: str) -> list[tuple[int, int, int, int]]:
    return [tuple(int(v) for v in m) for m in _BOX_RE.findall(text)]  # type: ignore[misc]


# Dedicated-token form (the "Add-Tokenizer" variant of iMOVE Table 6; the paper itself keeps plain numbers).
# A time "<q>" is already one string per value, so it becomes one added token as written. A coordinate is a
# bare number inside "[x1, y1, x2, y2]"; to be one token it is written "<c{v}>" inside the same brackets.
# The trainer rewrites export text with boxes_to_coord_tokens and model output back with
# coord_tokens_to_boxes, after which parse_boxes / parse_times read it as usual.
def time_token_vocabulary(n: int = N_TIME) -> list[str]:
    return [format_time(q) for q in range(n + 1)]


def format_coord_token(v: int) -> str:
    return f"<c{v}>"


def coord_token_vocabulary(n: int = N_SPACE) -> list[str]:
    return [format_coord_token(v) for v in range(n + 1)]


_COORD_TOKEN_RE = re.compile(r"<c(\d{1,4})>")


def boxes_to_coord_tokens(text: str) -> str:
    return _BOX_RE.sub(lambda m: "[" + ", ".join(format_coord_token(int(v)) for v in m.groups()) + "]", text)


def coord_tokens_to_boxes(text: str) -> str:
    return _COORD_TOKEN_RE.sub(r"\1", text)
