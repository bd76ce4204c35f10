"""Small MotionBench-style motion clips for compression ablations on a CPU (not a stage).

Each clip shows a textured square crossing a textured background in one of four directions; the question is
MotionBench's "Location-related Motion" kind, four options, one answer. A clip is defined in continuous
time (its trajectory over ``duration``), so the same clip can be sampled at any frame count: the ablation
compares compression methods on the *same* videos seen at different input frame rates, as MotionBench
section 5.2 does. Everything comes from the seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DIRECTIONS = ("left", "right", "up", "down")
OPTION_LETTERS = ("A", "B", "C", "D")
QUESTION = "Which way does the square move?\n" + "\n".join(
    f"{letter}. {d}" for letter, d in zip(OPTION_LETTERS, DIRECTIONS)) + "\nAnswer with the option's letter."
_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class MotionClip:
    frames: np.ndarray  # (n_frames, size, size, 3) uint8
    answer_index: int  # index into DIRECTIONS / OPTION_LETTERS
    seed: int


def render_motion_clip(seed: int, n_frames: int, size: int = 56, square_px: int | None = None,
                       travel_px: int | None = None) -> MotionClip:
    """One clip sampled at ``n_frames`` evenly spaced times over the same motion; the square is a fifth of
    the frame and travels half of it unless given."""
    square_px = max(2, size // 5) if square_px is None else square_px
    travel_px = size // 2 if travel_px is None else travel_px
    if n_frames < 2:
        raise ValueError(f"a motion clip needs at least 2 frames, got {n_frames}")
    if square_px + travel_px > size:
        raise ValueError(f"square {square_px}px travelling {travel_px}px does not fit a {size}px frame")
    rng = np.random.default_rng(seed)
    direction = int(rng.integers(len(DIRECTIONS)))
    dx, dy = _VECTORS[DIRECTIONS[direction]]
    background = rng.integers(0, 120, (size, size, 3)).astype(np.uint8)
    colour = rng.integers(150, 256, 3).astype(np.uint8)
    span = size - square_px - travel_px
    # start so the whole path stays inside the frame
    x0 = int(rng.integers(0, span + 1)) + (travel_px if dx < 0 else 0)
    y0 = int(rng.integers(0, span + 1)) + (travel_px if dy < 0 else 0)
    frames = np.repeat(background[None], n_frames, axis=0)
    for i, t in enumerate(np.linspace(0.0, 1.0, n_frames)):
        x = int(round(x0 + dx * travel_px * t))
        y = int(round(y0 + dy * travel_px * t))
        frames[i, y:y + square_px, x:x + square_px] = colour
    return MotionClip(frames, direction, seed)


def motion_clip_set(seed: int, n: int, n_frames: int, size: int = 56) -> list[MotionClip]:
    """``n`` clips from one dataset seed; the same (seed, i) is the same motion at any ``n_frames``."""
    return [render_motion_clip(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), n_frames, size)
            for i in range(n)]
