"""Synthetic videos with exact ground truth (the MotionBench paper's "virtual videos", section 3.1).

The paper renders Unity avatars because a graphics engine "exclusively focuses on motion changes" and
already knows the answer to every question. We do the same with a small numpy rasteriser: textured 2-D
objects over a textured, scrolling background, encoded with PyAV (libx264, yuv420p, fixed GOP). Every
random choice comes from the seed, so the same ``(seed, config)`` gives the same bytes, and everything that
was drawn is written down, so later stages (scene cuts, detection filters, tracking, QA) can be tested
exactly against it.

What a video contains (all randomised by the seed, all recorded):

* 1..N **shots** separated by hard cuts. A cut swaps the background texture and its colour palette
  (hues at least 100 degrees apart), so a content detector sees it clearly.
* a **camera pan** per shot: the background scrolls. ``direction`` is the *camera's* direction, so a camera
  panning ``right`` makes the background content move left on screen; ``none`` = static camera.
* **linear movers**: objects that rest, move in one direction at constant speed, then rest again.
* one **repeating** object: it either bounces left-right between two drawn walls (a repetition = a wall
  hit) or jumps k times in place (a repetition = one hop).
* one **sequence** object that performs two different actions one after the other
  (``move_left/right/up/down``, ``jump``, ``spin``), for action-order questions.
* one **static** object that never moves.
* optionally a planted **too large** object (covers > 60 % of the frame, static, present during one
  shot only) for testing size filters.

Objects are composited in screen space: their motion is relative to the frame, not to the scrolling
background (a static object stays put on screen while the camera pans). Objects are drawn in ``z_order``
(higher on top); the too-large object is always at the back.

Ground-truth JSON (one file beside each video, ``<name>.json``; frames are 0-based indices)::

    {
      "version": 1,
      "video": "synth_7_0.mp4",            # file name of the video
      "seed": 123456789,                   # per-video seed: render_video(path, seed, config) reproduces it
      "width": 320, "height": 240, "fps": 25, "num_frames": 100,
      "cuts": [40, 71],                    # first frame of every shot after the first
      "shots": [{"start_frame": 0, "end_frame": 39,          # inclusive
                 "camera_pan": {"direction": "left"|"right"|"up"|"down"|"none",
                                "speed_px_per_frame": 2.0},   # 0.0 when direction is "none"
                 "background": {"pattern": "clouds"|"stripes"|"tiles", "hue_deg": 210.0}}, ...],
      "objects": [{
          "object_id": 0, "category": "ball", "shape": "circle",
          "color": "red", "rgb": [220, 40, 40],             # base colour; the texture only darkens it
          "size_px": [40, 40],                              # unrotated width, height
          "z_order": 3, "static": false, "too_large": false,
          "boxes": [[frame, x1, y1, x2, y2], ...],          # ints, pixel edges: x2 = last column + 1;
                                                            # box of the object's pixels inside the frame
                                                            # (occlusion by other objects ignored); only
                                                            # frames where at least one pixel is visible
          "visibility": [[frame, fraction], ...],           # visible pixels / full unclipped object area,
                                                            # same frames as "boxes"
          "motion": {
              "type": "static"|"linear"|"bounce"|"jump"|"sequence",
              "direction": "left"|"right"|"up"|"down"|"none"   # linear / static
                           |"left-right" (bounce)|"up-down" (jump)|"mixed" (sequence),
              "speed_px_per_frame": 2.5,                   # 0.0 when static
              "start_frame": 12, "end_frame": 40,          # first and last frame of motion; null if static
              "repetitions": 0,                            # k for bounce / jump, else 0
              "repetition_frames": [],                     # bounce: frame of each wall hit;
                                                           # jump: take-off frame of each hop
              "repetition_spans": [],                      # [[start, end], ...] per repetition
              "actions": [],                               # sequence: the two action names in order
              "walls_x_px": null}                          # bounce: [left wall x, right wall x]
      }, ...],
      "events": [{"name": "move_right"|"move_left"|"move_up"|"move_down"|"jump"|"spin"|"bounce",
                  "object_id": 0, "start_frame": 12, "end_frame": 40}, ...],   # sorted by start frame
      "config": {...}                                      # the SynthConfig used
    }

Only the questions builder (:mod:`stages.synth.truth_qa`) and tests read this format; keep ``version`` in step
with any change.
"""
from __future__ import annotations

import colorsys
import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

GROUND_TRUTH_VERSION = 1

PanDirection = Literal["left", "right", "up", "down", "none"]
MotionType = Literal["static", "linear", "bounce", "jump", "sequence"]

# Category nouns are ones that open-vocabulary detectors and taggers (Grounding DINO, RAM++) know.
CATEGORY_SHAPES: dict[str, str] = {
    "ball": "circle",
    "donut": "ring",
    "box": "square",
    "star": "star",
    "kite": "diamond",
    "car": "car",
}
# Shapes whose rotation is visible from the outline (a spinning ball only shows its texture turning).
ROTATABLE_CATEGORIES = ("box", "star", "kite", "car")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 185, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 40),
    "purple": (145, 60, 205),
    "orange": (250, 140, 30),
    "cyan": (40, 205, 215),
    "white": (242, 242, 242),
    "pink": (245, 115, 185),
}

SEQUENCE_ACTIONS = ("move_left", "move_right", "move_up", "move_down", "jump", "spin")
_DIRECTION_VECTORS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "none": (0, 0)}
_BACKGROUND_PATTERNS = ("clouds", "stripes", "tiles")
_OBJECT_PATTERNS = ("stripes", "checker", "rings", "dots")


class SynthConfig(BaseModel):
    """How synthetic videos are drawn. Frozen; every video's JSON carries the config it was made with."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(320, ge=64, le=4096)
    height: int = Field(240, ge=64, le=4096)
    fps: int = Field(25, ge=1, le=120)
    min_duration_s: float = Field(3.0, gt=0)
    max_duration_s: float = Field(5.0, gt=0)
    min_shots: int = Field(1, ge=1)
    max_shots: int = Field(3, ge=1)
    # PySceneDetect's default min scene length is 15 frames (Panda-70M style splitting); keep shots longer.
    min_shot_frames: int = Field(25, ge=2)
    min_linear_objects: int = Field(1, ge=0)
    max_linear_objects: int = Field(2, ge=0)
    repeating_object: bool = True
    sequence_object: bool = True
    static_object: bool = True
    too_large_probability: float = Field(0.3, ge=0.0, le=1.0)
    static_camera_probability: float = Field(0.25, ge=0.0, le=1.0)
    max_pan_speed_px_per_frame: int = Field(4, ge=1)
    object_size_px: tuple[int, int] = (28, 44)
    min_speed_px_per_frame: float = Field(1.5, gt=0)
    max_speed_px_per_frame: float = Field(4.0, gt=0)
    min_repetitions: int = Field(2, ge=1)
    max_repetitions: int = Field(5, ge=1)
    # Start frames of different objects' first motions differ by at least this much, so "which starts
    # first" has one answer a viewer can see (0.4 s at 25 fps).
    min_start_gap_frames: int = Field(10, ge=1)
    # Encoding: fixed GOP (keyint = min-keyint, no scene-cut keyframes), one thread => reproducible bytes.
    gop_frames: int = Field(25, ge=1)
    crf: int = Field(18, ge=0, le=51)
    x264_preset: str = "veryfast"

    @model_validator(mode="after")
    def _check(self) -> "SynthConfig":
        if self.width % 2 or self.height % 2:
            raise ValueError(f"width and height must be even for yuv420p, got {self.width}x{self.height}")
        if self.min_duration_s > self.max_duration_s:
            raise ValueError("min_duration_s must be <= max_duration_s")
        if self.min_shots > self.max_shots:
            raise ValueError("min_shots must be <= max_shots")
        if self.min_linear_objects > self.max_linear_objects:
            raise ValueError("min_linear_objects must be <= max_linear_objects")
        if self.min_repetitions > self.max_repetitions:
            raise ValueError("min_repetitions must be <= max_repetitions")
        if self.min_speed_px_per_frame > self.max_speed_px_per_frame:
            raise ValueError("min_speed_px_per_frame must be <= max_speed_px_per_frame")
        lo, hi = self.object_size_px
        if not 4 <= lo <= hi or hi * 3 > min(self.width, self.height):
            raise ValueError(
                f"object_size_px {self.object_size_px} must satisfy 4 <= min <= max <= min(width, height) / 3"
            )
        min_frames = round(self.min_duration_s * self.fps)
        if min_frames < self.min_shots * self.min_shot_frames:
            raise ValueError(
                f"min_duration_s {self.min_duration_s} at {self.fps} fps gives {min_frames} frames, fewer than "
                f"min_shots * min_shot_frames = {self.min_shots * self.min_shot_frames}; lengthen the videos "
                "or lower min_shots / min_shot_frames"
            )
        if min_frames < 40:
            raise ValueError(f"videos need at least 40 frames (min_duration_s * fps = {min_frames})")
        n_objects = self.max_linear_objects + self.repeating_object + self.sequence_object + self.static_object + 1
        if n_objects > len(COLORS):
            raise ValueError(f"at most {len(COLORS) - 4} linear objects: every object needs its own colour")
        return self

    def config_hash(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CameraPan(_Frozen):
    direction: PanDirection
    speed_px_per_frame: float


class Background(_Frozen):
    pattern: str
    hue_deg: float


class Shot(_Frozen):
    start_frame: int
    end_frame: int
    camera_pan: CameraPan
    background: Background


class Motion(_Frozen):
    type: MotionType
    direction: str
    speed_px_per_frame: float = 0.0
    start_frame: int | None = None
    end_frame: int | None = None
    repetitions: int = 0
    repetition_frames: list[int] = []
    repetition_spans: list[list[int]] = []
    actions: list[str] = []
    walls_x_px: list[int] | None = None


class SynthObject(_Frozen):
    object_id: int
    category: str
    shape: str
    color: str
    rgb: list[int]
    size_px: list[int]
    z_order: int
    static: bool
    too_large: bool
    boxes: list[list[int]]
    visibility: list[list[float]]
    motion: Motion


class Event(_Frozen):
    name: str
    object_id: int
    start_frame: int
    end_frame: int


class GroundTruth(_Frozen):
    """Everything that was drawn in one synthetic video; ``to_json_dict`` gives the documented format."""

    version: int = GROUND_TRUTH_VERSION
    video: str
    seed: int
    width: int
    height: int
    fps: int
    num_frames: int
    cuts: list[int]
    shots: list[Shot]
    objects: list[SynthObject]
    events: list[Event]
    config: dict[str, Any]

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        _atomic_write_bytes(path, json.dumps(self.to_json_dict(), indent=1).encode())
        return path


def load_truth(path: str | Path) -> GroundTruth:
    """Read a ground-truth JSON written by :func:`render_video`; refuses other versions."""
    path = Path(path)
    data = json.loads(path.read_text())
    if data.get("version") != GROUND_TRUTH_VERSION:
        raise ValueError(
            f"{path}: ground-truth version {data.get('version')!r}, this code reads version "
            f"{GROUND_TRUTH_VERSION}; re-render the synthetic set with the current code"
        )
    return GroundTruth.model_validate(data)


# ----------------------------------------------------------------------------------------------------
# Planning: every random choice, before any pixel is drawn.


@dataclass
class _ObjectPlan:
    object_id: int
    category: str
    shape: str
    color: str
    rgb: np.ndarray
    half_w: float
    half_h: float
    pattern: str
    pattern_period: float
    motion_type: str
    # Per-frame centre offsets relative to `base` and rotation angle (radians), length num_frames.
    dx: np.ndarray
    dy: np.ndarray
    angle: np.ndarray
    present: np.ndarray  # bool per frame
    motion: dict[str, Any]
    events: list[dict[str, Any]]
    too_large: bool = False
    walls_rel_x: tuple[float, float] | None = None  # bounce walls, relative to base x
    base: tuple[float, float] = (0.0, 0.0)
    z_order: int = 0

    def path_rect(self) -> tuple[float, float, float, float]:
        r = math.hypot(self.half_w, self.half_h) if np.any(self.angle) else None
        hw = r if r is not None else self.half_w
        hh = r if r is not None else self.half_h
        bx, by = self.base
        x1, x2 = bx + float(self.dx.min()) - hw, bx + float(self.dx.max()) + hw
        if self.walls_rel_x is not None:
            x1, x2 = bx + self.walls_rel_x[0] - _WALL_WIDTH, bx + self.walls_rel_x[1] + _WALL_WIDTH
        return x1, by + float(self.dy.min()) - hh, x2, by + float(self.dy.max()) + hh


@dataclass
class _ShotPlan:
    start: int
    end: int
    direction: str
    speed: int
    pattern: str
    hue: float
    texture: np.ndarray = field(repr=False, default=None)  # (2H, 2W, 3) uint8, tileable
    origin: tuple[int, int] = (0, 0)


@dataclass
class _VideoPlan:
    seed: int
    config: SynthConfig
    num_frames: int
    shots: list[_ShotPlan]
    objects: list[_ObjectPlan]


_WALL_WIDTH = 6
_MARGIN = 4


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * rng.random())


def _plan_shots(rng: np.random.Generator, cfg: SynthConfig, n: int) -> list[_ShotPlan]:
    max_fit = n // cfg.min_shot_frames
    k = int(rng.integers(cfg.min_shots, min(cfg.max_shots, max_fit) + 1))
    extra = rng.multinomial(n - k * cfg.min_shot_frames, rng.dirichlet(np.ones(k)))
    lengths = extra + cfg.min_shot_frames
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
    shots = []
    hue = _uniform(rng, 0, 360)
    pattern = None
    directions = ("left", "right", "up", "down")
    for i in range(k):
        if i:
            hue = (hue + _uniform(rng, 100, 260)) % 360
        pattern = str(rng.choice([p for p in _BACKGROUND_PATTERNS if p != pattern]))
        if rng.random() < cfg.static_camera_probability:
            direction, speed = "none", 0
        else:
            direction = str(rng.choice(directions))
            speed = int(rng.integers(1, cfg.max_pan_speed_px_per_frame + 1))
        start = int(starts[i])
        shot = _ShotPlan(start, start + int(lengths[i]) - 1, direction, speed, pattern, hue)
        shot.texture = _background_texture(rng, cfg.width, cfg.height, pattern, hue, bright_first=i % 2 == 0)
        shot.origin = (int(rng.integers(0, 2 * cfg.width)), int(rng.integers(0, 2 * cfg.height)))
        shots.append(shot)
    return shots


def _periodic_noise(rng: np.random.Generator, h: int, w: int, cutoff_cycles: float) -> np.ndarray:
    """Smooth noise that tiles seamlessly (Gaussian low-pass of white noise in Fourier space), in [0, 1]."""
    white = rng.standard_normal((h, w))
    fy = np.fft.fftfreq(h) * h
    fx = np.fft.fftfreq(w) * w
    gain = np.exp(-(fy[:, None] ** 2 + fx[None, :] ** 2) / (2 * cutoff_cycles**2))
    smooth = np.fft.ifft2(np.fft.fft2(white) * gain).real
    smooth -= smooth.min()
    return smooth / max(float(smooth.max()), 1e-9)


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360) / 360, s, v), dtype=np.float32) * 255


def _background_texture(
    rng: np.random.Generator, width: int, height: int, pattern: str, hue: float, bright_first: bool
) -> np.ndarray:
    th, tw = 2 * height, 2 * width
    noise = _periodic_noise(rng, th, tw, cutoff_cycles=8.0)
    y, x = np.mgrid[0:th, 0:tw].astype(np.float32)
    if pattern == "clouds":
        value = 0.75 * noise + 0.25 * _periodic_noise(rng, th, tw, cutoff_cycles=24.0)
    elif pattern == "stripes":
        kx, ky = int(rng.integers(3, 9)), int(rng.integers(-6, 7))
        value = 0.5 + 0.5 * np.sin(2 * np.pi * (kx * x / tw + ky * y / th) + 4.0 * noise)
    else:  # tiles: a period dividing both texture sides keeps it tileable
        g = math.gcd(th, tw)
        periods = [p for p in range(16, 81) if g % p == 0] or [g]
        p = int(rng.choice(periods))
        checker = ((x // p + y // p) % 2).astype(np.float32)
        value = 0.6 * checker + 0.4 * noise
    value = value.astype(np.float32)
    # Alternate dark and bright palettes between consecutive shots, on top of the hue jump.
    v_lo, v_hi = (0.45, 0.85) if bright_first else (0.15, 0.5)
    c0 = _hsv(hue, 0.55, v_lo)
    c1 = _hsv(hue + 35, 0.35, v_hi)
    tex = c0[None, None, :] + value[..., None] * (c1 - c0)[None, None, :]
    return np.clip(tex + 0.5, 0, 255).astype(np.uint8)


def _rest_move(n: int, start: int, end: int, vec: tuple[int, int], speed: float) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of an object that rests, moves at `speed` along `vec` during [start, end], then rests."""
    t = np.arange(n, dtype=np.float64)
    travel = np.clip(t - start, 0, end - start) * speed
    return travel * vec[0], travel * vec[1]


def _hop(t: np.ndarray, start: int, duration: int, height: float) -> np.ndarray:
    p = np.clip((t - start) / duration, 0.0, 1.0)
    return -4.0 * height * p * (1.0 - p)


def _size(rng: np.random.Generator, cfg: SynthConfig, category: str) -> tuple[float, float]:
    s = _uniform(rng, *cfg.object_size_px) / 2
    if category == "car":
        return s * 1.3, s * 0.75
    if category == "kite":
        return s * 0.75, s
    return s, s


class _Planner:
    def __init__(self, rng: np.random.Generator, cfg: SynthConfig, n: int):
        self.rng, self.cfg, self.n = rng, cfg, n
        self.t = np.arange(n, dtype=np.float64)
        self.start_frames: list[int] = []

    def start_frame(self, latest: int) -> int:
        """A first-motion frame at least `min_start_gap_frames` away from every other object's."""
        latest = max(latest, 0)
        gap = self.cfg.min_start_gap_frames
        candidates = [s for s in range(0, latest + 1) if all(abs(s - o) >= gap for o in self.start_frames)]
        s = int(self.rng.choice(candidates)) if candidates else int(self.rng.integers(0, latest + 1))
        self.start_frames.append(s)
        return s

    def obj(self, oid: int, category: str, color: str, motion_type: str, **kw: Any) -> _ObjectPlan:
        rng, n = self.rng, self.n
        half_w, half_h = kw.pop("half", None) or _size(rng, self.cfg, category)
        return _ObjectPlan(
            object_id=oid,
            category=category,
            shape=CATEGORY_SHAPES[category],
            color=color,
            rgb=np.array(COLORS[color], dtype=np.float32),
            half_w=half_w,
            half_h=half_h,
            pattern=str(rng.choice(_OBJECT_PATTERNS)),
            pattern_period=_uniform(rng, 0.35, 0.7),
            motion_type=motion_type,
            dx=kw.pop("dx", np.zeros(n)),
            dy=kw.pop("dy", np.zeros(n)),
            angle=kw.pop("angle", np.zeros(n)),
            present=kw.pop("present", np.ones(n, dtype=bool)),
            motion=kw.pop("motion"),
            events=kw.pop("events", []),
            **kw,
        )

    def linear(self, oid: int, category: str, color: str) -> _ObjectPlan:
        rng, cfg, n = self.rng, self.cfg, self.n
        half_w, half_h = _size(rng, cfg, category)
        direction = str(rng.choice(["left", "right", "up", "down"]))
        vec = _DIRECTION_VECTORS[direction]
        extent = cfg.width - 2 * (half_w + _MARGIN) if vec[0] else cfg.height - 2 * (half_h + _MARGIN)
        min_frames = 15
        speed = _uniform(rng, cfg.min_speed_px_per_frame, cfg.max_speed_px_per_frame)
        speed = min(speed, extent / min_frames)
        start = self.start_frame(n - min_frames - 2)
        max_frames = min(n - 1 - start, int(extent / speed))
        frames = int(rng.integers(min(min_frames, max_frames), max_frames + 1))
        end = start + frames
        dx, dy = _rest_move(n, start, end, vec, speed)
        motion = dict(type="linear", direction=direction, speed_px_per_frame=round(speed, 4),
                      start_frame=start, end_frame=end)
        events = [dict(name=f"move_{direction}", object_id=oid, start_frame=start, end_frame=end)]
        return self.obj(oid, category, color, "linear", half=(half_w, half_h), dx=dx, dy=dy,
                        motion=motion, events=events)

    def jump(self, oid: int, category: str, color: str) -> _ObjectPlan:
        rng, cfg, n = self.rng, self.cfg, self.n
        half_w, half_h = _size(rng, cfg, category)
        hop_frames = int(rng.integers(10, 17))
        gap = int(rng.integers(3, 9))
        fit = (n - 2 + gap) // (hop_frames + gap)
        k = int(rng.integers(min(cfg.min_repetitions, fit), min(cfg.max_repetitions, fit) + 1))
        total = k * hop_frames + (k - 1) * gap
        start = self.start_frame(n - 1 - total)
        height = _uniform(rng, 22, min(45, cfg.height / 4))
        dy = np.zeros(n)
        spans, takeoffs, events = [], [], []
        for i in range(k):
            s = start + i * (hop_frames + gap)
            dy += _hop(self.t, s, hop_frames, height)
            spans.append([s, s + hop_frames])
            takeoffs.append(s)
            events.append(dict(name="jump", object_id=oid, start_frame=s, end_frame=s + hop_frames))
        motion = dict(type="jump", direction="up-down", speed_px_per_frame=round(4 * height / hop_frames, 4),
                      start_frame=start, end_frame=start + total, repetitions=k,
                      repetition_frames=takeoffs, repetition_spans=spans)
        return self.obj(oid, category, color, "jump", half=(half_w, half_h), dy=dy, motion=motion, events=events)

    def bounce(self, oid: int, category: str, color: str) -> _ObjectPlan:
        rng, cfg, n = self.rng, self.cfg, self.n
        half_w, half_h = _size(rng, cfg, category)
        max_span = cfg.width - 2 * (_MARGIN + _WALL_WIDTH) - 2 * half_w  # centre travel between walls
        start = self.start_frame(n // 4)
        active = n - 1 - start
        # Choose k and a speed so that the wall distance is between 2.5 and `max_span` object widths...
        for _ in range(50):
            k = int(rng.integers(cfg.min_repetitions, cfg.max_repetitions + 1))
            lead, tail = _uniform(rng, 0.2, 0.8), _uniform(rng, 0.2, 0.8)
            speed = _uniform(rng, 3.0, 9.0)
            span = speed * active / (k + lead + tail)
            if 5 * half_w <= span <= max_span and span / speed >= 8:
                break
        else:  # fall back to the slowest legal setting: fewer repetitions, widest span
            k = cfg.min_repetitions
            lead = tail = 0.5
            span = max_span
            speed = span * (k + lead + tail) / active
        # Simulate the reflections frame by frame; the hit frame is the first frame after the reversal.
        pos = (1 - lead) * span  # moving right first, `lead` of the span before the first (right) hit
        vel = speed
        xs = np.zeros(n)
        hits: list[int] = []
        end = n - 1
        for t in range(n):
            if t > start and end == n - 1:
                pos += vel
                if pos > span or pos < 0:
                    pos = 2 * span - pos if pos > span else -pos
                    vel = -vel
                    hits.append(t)
                if len(hits) == k and (t - hits[-1]) >= tail * span / speed:
                    end = t
            xs[t] = pos
        if len(hits) < k:  # the video ended before the last planned hit; record what was drawn
            k = len(hits)
        if rng.random() < 0.5:  # mirror: move left first
            xs = span - xs
        walls = (-half_w - 0.5, span + half_w + 0.5)
        motion = dict(type="bounce", direction="left-right", speed_px_per_frame=round(speed, 4),
                      start_frame=start, end_frame=end, repetitions=k, repetition_frames=hits[:k],
                      repetition_spans=[[h, h] for h in hits[:k]])
        events = [dict(name="bounce", object_id=oid, start_frame=h, end_frame=h) for h in hits[:k]]
        return self.obj(oid, category, color, "bounce", half=(half_w, half_h), dx=xs, motion=motion,
                        events=events, walls_rel_x=walls)

    def sequence(self, oid: int, category: str, color: str) -> _ObjectPlan:
        rng, cfg, n = self.rng, self.cfg, self.n
        half_w, half_h = _size(rng, cfg, category)
        a1, a2 = (str(a) for a in rng.choice(SEQUENCE_ACTIONS, size=2, replace=False))
        durations = []
        for a in (a1, a2):
            if a == "jump":
                durations.append(int(rng.integers(12, 19)))
            elif a == "spin":
                durations.append(int(rng.integers(16, 29)))
            else:
                durations.append(int(rng.integers(15, 26)))
        gap = int(rng.integers(6, 16))
        total = durations[0] + gap + durations[1]
        if total > n - 2:
            gap = max(2, n - 2 - durations[0] - durations[1])
            total = durations[0] + gap + durations[1]
        start = self.start_frame(n - 1 - total)
        dx, dy, angle = np.zeros(n), np.zeros(n), np.zeros(n)
        events = []
        s = start
        for a, d in zip((a1, a2), durations):
            if a.startswith("move_"):
                vec = _DIRECTION_VECTORS[a[5:]]
                speed = _uniform(rng, 2.0, 3.5)
                mx, my = _rest_move(n, s, s + d, vec, speed)
                dx, dy = dx + mx, dy + my
            elif a == "jump":
                dy = dy + _hop(self.t, s, d, _uniform(rng, 25, min(45, cfg.height / 4)))
            else:
                sign = 1.0 if rng.random() < 0.5 else -1.0
                angle = angle + sign * 2 * np.pi * np.clip((self.t - s) / d, 0.0, 1.0)
            events.append(dict(name=a, object_id=oid, start_frame=s, end_frame=s + d))
            s += d + gap
        motion = dict(type="sequence", direction="mixed", start_frame=start, end_frame=start + total,
                      actions=[a1, a2])
        return self.obj(oid, category, color, "sequence", half=(half_w, half_h), dx=dx, dy=dy, angle=angle,
                        motion=motion, events=events)

    def static(self, oid: int, category: str, color: str) -> _ObjectPlan:
        motion = dict(type="static", direction="none")
        return self.obj(oid, category, color, "static", motion=motion)

    def too_large(self, oid: int, color: str, shots: list[_ShotPlan]) -> _ObjectPlan:
        cfg, n = self.cfg, self.n
        shot = shots[int(self.rng.integers(0, len(shots)))]
        present = np.zeros(n, dtype=bool)
        present[shot.start : shot.end + 1] = True
        half = (_uniform(self.rng, 0.84, 0.92) * cfg.width / 2, _uniform(self.rng, 0.8, 0.9) * cfg.height / 2)
        motion = dict(type="static", direction="none")
        plan = self.obj(oid, "box", color, "static", half=half, present=present, motion=motion, too_large=True)
        plan.base = (cfg.width / 2 + _uniform(self.rng, -4, 4), cfg.height / 2 + _uniform(self.rng, -4, 4))
        return plan


def _place(rng: np.random.Generator, cfg: SynthConfig, plan: _ObjectPlan, taken: list[tuple]) -> None:
    """Pick a base position keeping the whole path in frame, preferring no overlap with earlier paths."""
    probe = dataclasses.replace(plan, base=(0.0, 0.0))
    x1, y1, x2, y2 = probe.path_rect()
    lo_x, hi_x = _MARGIN - x1, cfg.width - _MARGIN - x2
    lo_y, hi_y = _MARGIN - y1, cfg.height - _MARGIN - y2
    if hi_x < lo_x:
        lo_x = hi_x = (lo_x + hi_x) / 2
    if hi_y < lo_y:
        lo_y = hi_y = (lo_y + hi_y) / 2
    best, best_overlap = None, math.inf
    for _ in range(40):
        base = (_uniform(rng, lo_x, hi_x), _uniform(rng, lo_y, hi_y))
        rect = (x1 + base[0], y1 + base[1], x2 + base[0], y2 + base[1])
        overlap = sum(
            max(0.0, min(rect[2], r[2]) - max(rect[0], r[0])) * max(0.0, min(rect[3], r[3]) - max(rect[1], r[1]))
            for r in taken
        )
        if overlap < best_overlap:
            best, best_overlap = base, overlap
        if overlap == 0:
            break
    plan.base = best
    taken.append(plan.path_rect())


def _plan_video(seed: int, config: SynthConfig) -> _VideoPlan:
    rng = np.random.default_rng(seed)
    cfg = config
    n = int(round(_uniform(rng, cfg.min_duration_s, cfg.max_duration_s) * cfg.fps))
    shots = _plan_shots(rng, cfg, n)
    planner = _Planner(rng, cfg, n)

    roles: list[str] = []
    if cfg.sequence_object:
        roles.append("sequence")
    if cfg.repeating_object:
        roles.append(str(rng.choice(["bounce", "jump"])))
    roles += ["linear"] * int(rng.integers(cfg.min_linear_objects, cfg.max_linear_objects + 1))
    if cfg.static_object:
        roles.append("static")
    too_large = rng.random() < cfg.too_large_probability

    colors = [str(c) for c in rng.permutation(list(COLORS))]
    categories: list[str] = []
    for role in roles:
        pool = list(ROTATABLE_CATEGORIES) if role == "sequence" else list(CATEGORY_SHAPES)
        fresh = [c for c in pool if c not in categories] or pool
        categories.append(str(rng.choice(fresh)))

    objects: list[_ObjectPlan] = []
    taken: list[tuple] = []
    oid = 0
    if too_large:
        objects.append(planner.too_large(oid, colors.pop(), shots))
        oid += 1
    for role, category in zip(roles, categories):
        plan = getattr(planner, role)(oid, category, colors.pop())
        _place(rng, cfg, plan, taken)
        objects.append(plan)
        oid += 1
    # Draw order: the too-large object at the back, then the rest in a random order.
    order = [o for o in objects if o.too_large] + [objects[i] for i in rng.permutation(len(objects)) if not objects[i].too_large]
    for z, o in enumerate(order):
        o.z_order = z
    return _VideoPlan(seed=seed, config=cfg, num_frames=n, shots=shots, objects=objects)


# ----------------------------------------------------------------------------------------------------
# Rasterising.


def _shape_mask(shape: str, un: np.ndarray, vn: np.ndarray) -> np.ndarray:
    """Inside test on coordinates normalised to the object's half extents ([-1, 1] box)."""
    if shape == "circle":
        return un * un + vn * vn <= 1.0
    if shape == "ring":
        r2 = un * un + vn * vn
        return (r2 <= 1.0) & (r2 >= 0.3)
    if shape == "square":
        return (np.abs(un) <= 1.0) & (np.abs(vn) <= 1.0)
    if shape == "diamond":
        return np.abs(un) + np.abs(vn) <= 1.0
    if shape == "star":
        r = np.hypot(un, vn)
        theta = np.arctan2(vn, un) + np.pi / 2
        boundary = 0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 2
        return r <= boundary
    if shape == "car":
        body = (np.abs(un) <= 1.0) & (vn >= -0.2) & (vn <= 0.55)
        cabin = (np.abs(un + 0.05) <= 0.55) & (vn >= -1.0) & (vn < -0.2)
        wheel_l = (un + 0.55) ** 2 + ((vn - 0.62) * 1.6) ** 2 <= 0.09
        wheel_r = (un - 0.55) ** 2 + ((vn - 0.62) * 1.6) ** 2 <= 0.09
        return body | cabin | wheel_l | wheel_r
    raise ValueError(f"unknown shape {shape!r}")


def _object_pattern(pattern: str, u: np.ndarray, v: np.ndarray, period: float) -> np.ndarray:
    if pattern == "stripes":
        return 0.5 + 0.5 * np.sin(2 * np.pi * u / period)
    if pattern == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if pattern == "rings":
        return 0.5 + 0.5 * np.cos(2 * np.pi * np.hypot(u, v) / period)
    return (np.cos(2 * np.pi * u / period) * np.cos(2 * np.pi * v / period) > 0.3).astype(np.float32)


@dataclass
class _Sprite:
    x0: int
    y0: int
    mask: np.ndarray  # bool (h, w), unclipped
    rgb: np.ndarray  # uint8 (h, w, 3)
    area: int


def _sprite(o: _ObjectPlan, cx: float, cy: float, angle: float) -> _Sprite:
    r = math.hypot(o.half_w, o.half_h) if angle else max(o.half_w, o.half_h)
    x0, x1 = int(math.floor(cx - r)) - 1, int(math.ceil(cx + r)) + 1
    y0, y1 = int(math.floor(cy - r)) - 1, int(math.ceil(cy + r)) + 1
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    px, py = xs + 0.5 - cx, ys + 0.5 - cy  # pixel centres
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        px, py = c * px + s * py, -s * px + c * py
    un, vn = px / o.half_w, py / o.half_h
    mask = _shape_mask(o.shape, un, vn)
    # Texture lives in object coordinates (it moves and turns with the object); it only darkens the base
    # colour (factor 0.7..1), so the object's mean colour stays close to its named colour.
    shade = 0.7 + 0.3 * _object_pattern(o.pattern, un, vn, o.pattern_period)
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    shade = np.where(mask & ~inner, 0.55, shade)  # a dark outline separates it from the background
    rgb = np.clip(o.rgb[None, None, :] * shade[..., None] + 0.5, 0, 255).astype(np.uint8)
    return _Sprite(x0, y0, mask, rgb, int(mask.sum()))


def _draw_walls(frame: np.ndarray, o: _ObjectPlan) -> None:
    h, w = frame.shape[:2]
    bx, by = o.base
    top = max(0, int(by - o.half_h - 10))
    bottom = min(h, int(by + o.half_h + 10))
    for edge, side in ((o.walls_rel_x[0], -1), (o.walls_rel_x[1], 1)):
        xe = int(round(bx + edge))
        xa, xb = (xe - _WALL_WIDTH, xe) if side < 0 else (xe, xe + _WALL_WIDTH)
        xa, xb = max(0, xa), min(w, xb)
        stripes = ((np.arange(top, bottom) // 4) % 2)[:, None, None]
        frame[top:bottom, xa:xb] = np.where(stripes == 1, 235, 70).astype(np.uint8)


def _render(plan: _VideoPlan, video_name: str) -> tuple[GroundTruth, np.ndarray]:
    cfg = plan.config
    n, h, w = plan.num_frames, cfg.height, cfg.width
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    tiled = {id(s): np.tile(s.texture, (2, 2, 1)) for s in plan.shots}
    shot_of = np.zeros(n, dtype=int)
    for i, s in enumerate(plan.shots):
        shot_of[s.start : s.end + 1] = i
    draw_order = sorted(plan.objects, key=lambda o: o.z_order)
    boxes: dict[int, list[list[int]]] = {o.object_id: [] for o in plan.objects}
    visibility: dict[int, list[list[float]]] = {o.object_id: [] for o in plan.objects}
    cache: dict[int, tuple[tuple, _Sprite]] = {}
    owner = np.empty((h, w), dtype=np.int16)
    for t in range(n):
        shot = plan.shots[shot_of[t]]
        vx, vy = _DIRECTION_VECTORS[shot.direction]
        ox = (shot.origin[0] + vx * shot.speed * (t - shot.start)) % (2 * w)
        oy = (shot.origin[1] + vy * shot.speed * (t - shot.start)) % (2 * h)
        frame = frames[t]
        frame[:] = tiled[id(shot)][oy : oy + h, ox : ox + w]
        owner.fill(-1)
        drawn: list[tuple[_ObjectPlan, _Sprite, tuple[slice, slice], tuple[slice, slice]]] = []
        for o in draw_order:
            if o.walls_rel_x is not None:
                _draw_walls(frame, o)
        for o in draw_order:
            if not o.present[t]:
                continue
            state = (round(o.base[0] + o.dx[t], 3), round(o.base[1] + o.dy[t], 3), round(float(o.angle[t]), 5))
            hit = cache.get(o.object_id)
            if hit is not None and hit[0] == state:
                sprite = hit[1]
            else:
                sprite = _sprite(o, *state)
                cache[o.object_id] = (state, sprite)
            sh, sw = sprite.mask.shape
            fx0, fy0 = max(0, sprite.x0), max(0, sprite.y0)
            fx1, fy1 = min(w, sprite.x0 + sw), min(h, sprite.y0 + sh)
            if fx1 <= fx0 or fy1 <= fy0:
                continue
            fsl = (slice(fy0, fy1), slice(fx0, fx1))
            ssl = (slice(fy0 - sprite.y0, fy1 - sprite.y0), slice(fx0 - sprite.x0, fx1 - sprite.x0))
            m = sprite.mask[ssl]
            if not m.any():
                continue
            frame[fsl][m] = sprite.rgb[ssl][m]
            owner[fsl][m] = o.object_id
            drawn.append((o, sprite, fsl, ssl))
        for o, sprite, fsl, ssl in drawn:
            m = sprite.mask[ssl]
            visible = int(np.count_nonzero(owner[fsl] == o.object_id))
            if visible == 0:
                continue
            rows = np.flatnonzero(m.any(axis=1))
            cols = np.flatnonzero(m.any(axis=0))
            x1, y1 = fsl[1].start + int(cols[0]), fsl[0].start + int(rows[0])
            x2, y2 = fsl[1].start + int(cols[-1]) + 1, fsl[0].start + int(rows[-1]) + 1
            boxes[o.object_id].append([t, x1, y1, x2, y2])
            visibility[o.object_id].append([t, round(visible / sprite.area, 4)])
    truth = _truth(plan, video_name, boxes, visibility)
    return truth, frames


def _truth(plan: _VideoPlan, video_name: str, boxes: dict, visibility: dict) -> GroundTruth:
    cfg = plan.config
    shots = [
        Shot(
            start_frame=s.start,
            end_frame=s.end,
            camera_pan=CameraPan(direction=s.direction, speed_px_per_frame=float(s.speed)),
            background=Background(pattern=s.pattern, hue_deg=round(s.hue, 2)),
        )
        for s in plan.shots
    ]
    objects = []
    events = []
    for o in plan.objects:
        motion = dict(o.motion)
        if o.walls_rel_x is not None:
            motion["walls_x_px"] = [int(round(o.base[0] + x)) for x in o.walls_rel_x]
        objects.append(
            SynthObject(
                object_id=o.object_id,
                category=o.category,
                shape=o.shape,
                color=o.color,
                rgb=[int(c) for c in o.rgb],
                size_px=[int(round(2 * o.half_w)), int(round(2 * o.half_h))],
                z_order=o.z_order,
                static=o.motion_type == "static",
                too_large=o.too_large,
                boxes=boxes[o.object_id],
                visibility=visibility[o.object_id],
                motion=Motion(**motion),
            )
        )
        events.extend(Event(**e) for e in o.events)
    events.sort(key=lambda e: (e.start_frame, e.object_id, e.name))
    return GroundTruth(
        video=video_name,
        seed=plan.seed,
        width=cfg.width,
        height=cfg.height,
        fps=cfg.fps,
        num_frames=plan.num_frames,
        cuts=[s.start for s in plan.shots[1:]],
        shots=shots,
        objects=objects,
        events=events,
        config=cfg.model_dump(mode="json"),
    )


def render_frames(seed: int, config: SynthConfig | None = None, video_name: str = "") -> tuple[GroundTruth, np.ndarray]:
    """Draw one video in memory: its ground truth and the RGB frames, uint8 (num_frames, height, width, 3)."""
    config = config or SynthConfig()
    return _render(_plan_video(seed, config), video_name or f"synth_{seed}.mp4")


# ----------------------------------------------------------------------------------------------------
# Encoding.


def _rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """BT.601 limited range, 2x2 chroma averaging; done here (not by swscale) so bytes do not depend on
    the host's SIMD paths. Returns the planar (H * 3 / 2, W) layout PyAV expects for yuv420p."""
    f = frame.astype(np.float32)
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
    u = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0
    v = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0
    h, w = y.shape

    def sub(c: np.ndarray) -> np.ndarray:
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [y, sub(u), sub(v)]
    out = np.empty((h * 3 // 2, w), dtype=np.uint8)
    out[:h] = np.clip(np.rint(planes[0]), 0, 255)
    out[h : h + h // 4] = np.clip(np.rint(planes[1]), 0, 255).reshape(h // 4, w)
    out[h + h // 4 :] = np.clip(np.rint(planes[2]), 0, 255).reshape(h // 4, w)
    return out


def encode_frames(frames: np.ndarray, out_path: str | Path, config: SynthConfig) -> Path:
    """Write RGB frames as H.264 MP4, reproducibly: one encoder thread, fixed GOP, no scene-cut keyframes, no
    macroblock-tree rate control (it made the bytes depend on uninitialised memory), bit-exact muxing (no creation
    time or version-dependent metadata)."""
    import av

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.stem}.", suffix=".mp4", dir=out_path.parent)
    os.close(fd)
    g = config.gop_frames
    try:
        with av.open(tmp, "w", format="mp4", options={"fflags": "+bitexact"}) as container:
            stream = container.add_stream(
                "libx264",
                rate=Fraction(config.fps),
                options={
                    "preset": config.x264_preset,
                    "crf": str(config.crf),
                    "threads": "1",
                    # mbtree=0: libx264's macroblock-tree rate control reads uninitialised memory at some frame
                    # sizes (320x240, 176x144, 200x150 among others), so with it the bytes depended on what the
                    # process's heap held before (tests/synth/test_videos.py replays this with MALLOC_PERTURB_)
                    "x264-params": f"keyint={g}:min-keyint={g}:scenecut=0:threads=1:lookahead-threads=1:mbtree=0",
                },
            )
            stream.width, stream.height, stream.pix_fmt = config.width, config.height, "yuv420p"
            stream.codec_context.thread_count = 1
            stream.codec_context.flags |= av.codec.context.Flags.bitexact
            stream.time_base = Fraction(1, config.fps)
            for i, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(_rgb_to_yuv420p(rgb), format="yuv420p")
                frame.pts = i
                frame.time_base = Fraction(1, config.fps)
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_video(out_path: str | Path, seed: int, config: SynthConfig | None = None) -> GroundTruth:
    """Render one synthetic video to ``out_path`` (.mp4) and its ground truth beside it (same stem, .json).

    Same ``(seed, config)`` => byte-identical video and JSON.
    """
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".mp4":
        raise ValueError(f"render_video writes MP4; give a path ending in .mp4, got {out_path}")
    config = config or SynthConfig()
    truth, frames = render_frames(seed, config, out_path.name)
    encode_frames(frames, out_path, config)
    truth.write_json(out_path.with_suffix(".json"))
    return truth


def video_seed(dataset_seed: int, index: int) -> int:
    """The per-video seed of video `index` in a dataset drawn with `dataset_seed` (stable, 32 bits)."""
    return int(np.random.SeedSequence([int(dataset_seed), int(index)]).generate_state(1)[0])


def render_dataset(out_dir: str | Path, n: int, seed: int, config: SynthConfig | None = None) -> list[Path]:
    """Render `n` videos ``<out_dir>/synth_<seed>_<i>.mp4`` with ``.json`` ground truth beside each.

    A video whose MP4 and JSON both exist is kept (re-runs resume); returns the MP4 paths in index order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    config = config or SynthConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = out_dir / f"synth_{seed}_{i}.mp4"
        truth_path = path.with_suffix(".json")
        if not (path.exists() and truth_path.exists() and _same_config(truth_path, config)):
            render_video(path, video_seed(seed, i), config)
        paths.append(path)
    return paths


def _same_config(truth_path: Path, config: SynthConfig) -> bool:
    try:
        return json.loads(truth_path.read_text()).get("config") == config.model_dump(mode="json")
    except (OSError, ValueError):
        return False
