"""Four-option questions built from a synthetic video's ground truth (MotionBench's "virtual videos").

MotionBench section 3.1: "For virtual videos, where we already possess the ground truth annotations for
each query, we automatically construct the questions and corresponding options." This module does that for
the videos of :mod:`stages.synth.videos`, reading only the ground-truth JSON (``GroundTruth.to_json_dict()``).

Every question is correct by construction and only asked where the truth makes it unambiguous:

============  ==========  =====================================================================================
kind          category    asked when
============  ==========  =====================================================================================
repetition    RC          an object bounces between walls (count = wall hits) or jumps k times
_count
motion        LM          a linear mover (it moves one way only), options = the four directions
_direction
motion_type   MR          a bouncing, jumping or static object; distractors are motions it never makes
action_order  AO          the sequence object's two actions; distractors reverse them or swap in an action it
                          never makes (and none that one of its actions implies, e.g. "moves up" for a jump)
start_order   AO          two moving objects whose first motions start >= ``MIN_START_GAP_FRAMES`` apart
camera_pan    CM          each shot not covered by a planted too-large object; "It does not move" is an option
                          and is the answer on a static-camera shot
static        MO          exactly one (normal-size) object never moves
_object
moving        MO          exactly one object moves in a given direction at some point
_object
============  ==========  =====================================================================================

Planted too-large objects are never asked about and never used as options. Which questions are asked and
with which distractors depends on the truth only; ``seed`` orders the options. Answer letters are balanced:
within a video, question i gets letter ``(offset + i) % 4`` for a seed-drawn offset, and the distractors
are shuffled by the seed, so letters are close to uniform over a data set.
"""
from __future__ import annotations

import random
import uuid
from dataclasses import dataclass
from typing import Any, Iterable

LETTERS = ("A", "B", "C", "D")
CATEGORIES = ("MR", "LM", "AO", "RC", "MO", "CM")
# First motions closer than this are not compared ("which starts first" must be visible: 0.32 s at 25 fps).
MIN_START_GAP_FRAMES = 8
_NAMESPACE = uuid.UUID("6f9b2d8e-5a51-4d0c-9b7e-3c0f2a9d7e41")

DIRECTION_OPTIONS = {"left": "To the left", "right": "To the right", "up": "Upward", "down": "Downward"}
PAN_OPTIONS = {
    "left": "It pans to the left",
    "right": "It pans to the right",
    "up": "It pans upward",
    "down": "It pans downward",
    "none": "It does not move",
}
MOTION_TYPE_OPTIONS = {
    "bounce": "It bounces back and forth between two walls",
    "jump": "It jumps up and down in place",
    "spin": "It spins in place",
    "static": "It stays still the whole time",
    "move_left": "It moves steadily to the left",
    "move_right": "It moves steadily to the right",
    "move_up": "It moves steadily upward",
    "move_down": "It moves steadily downward",
}
ACTION_PHRASES = {
    "move_left": "moves to the left",
    "move_right": "moves to the right",
    "move_up": "moves up",
    "move_down": "moves down",
    "jump": "jumps",
    "spin": "spins around",
}
DIRECTION_WORDS = {"left": "leftward", "right": "rightward", "up": "upward", "down": "downward"}
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")
SAME_TIME = "They start moving at the same time"
NEITHER = "Neither of them moves"
# Used to fill options with objects that are not in the video when a video has too few objects.
_FILLER_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white", "pink", "brown", "gray")
_FILLER_CATEGORIES = ("ball", "donut", "box", "star", "kite", "car")


@dataclass(frozen=True)
class SynthQuestion:
    video: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # letter A-D
    category: str  # one of CATEGORIES
    kind: str

    @property
    def question_id(self) -> str:
        """Deterministic id (uuid5 of video, question and options): a re-run gives the same keys."""
        return str(uuid.uuid5(_NAMESPACE, "\x1f".join((self.video, self.question, *self.options))))

    @property
    def answer_text(self) -> str:
        return self.options[LETTERS.index(self.answer)]

    def formatted(self) -> str:
        """The question with its options as ``A. ...`` lines, as in MotionBench's ``video_info.meta.jsonl``."""
        return "\n".join([self.question, *(f"{l}. {o}" for l, o in zip(LETTERS, self.options))])


@dataclass(frozen=True)
class _Draft:
    kind: str
    category: str
    question: str
    correct: str
    distractors: tuple[str, str, str]


def _name(obj: dict[str, Any]) -> str:
    return f"the {obj['color']} {obj['category']}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _askable(truth: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in truth["objects"] if not o["too_large"] and o["boxes"]]


def _direction_set(obj: dict[str, Any]) -> set[str]:
    """Screen directions an object moves in at some point."""
    m = obj["motion"]
    if m["type"] == "linear":
        return {m["direction"]}
    if m["type"] == "bounce":
        return {"left", "right"}
    if m["type"] == "jump":
        return {"up", "down"}
    if m["type"] == "sequence":
        dirs: set[str] = set()
        for a in m["actions"]:
            if a.startswith("move_"):
                dirs.add(a[5:])
            elif a == "jump":
                dirs |= {"up", "down"}
        return dirs
    return set()


def _repetition_count(truth: dict[str, Any], rng: random.Random) -> Iterable[_Draft]:
    for o in _askable(truth):
        m = o["motion"]
        k = m["repetitions"]
        if m["type"] not in ("bounce", "jump") or k < 1:
            continue
        if m["type"] == "bounce":
            q = f"How many times does {_name(o)} hit one of the walls?"
        else:
            q = f"How many times does {_name(o)} jump?"
        near = [c for c in range(max(1, k - 3), k + 4) if c != k]
        near.sort(key=lambda c: (abs(c - k), c))
        picks = rng.sample(near[:5], 3)
        yield _Draft("repetition_count", "RC", q, str(k), tuple(str(c) for c in picks))


def _motion_direction(truth: dict[str, Any], rng: random.Random) -> Iterable[_Draft]:
    for o in _askable(truth):
        m = o["motion"]
        if m["type"] != "linear" or m["direction"] not in DIRECTION_OPTIONS:
            continue
        others = [DIRECTION_OPTIONS[d] for d in DIRECTION_OPTIONS if d != m["direction"]]
        q = f"In which direction does {_name(o)} move across the frame?"
        yield _Draft("motion_direction", "LM", q, DIRECTION_OPTIONS[m["direction"]], tuple(others))


def _motion_type(truth: dict[str, Any], rng: random.Random) -> Iterable[_Draft]:
    for o in _askable(truth):
        t = o["motion"]["type"]
        if t == "bounce":
            pool = ["jump", "spin", "static"]
        elif t == "jump":
            pool = ["bounce", "spin", "static"]
        elif t == "static":
            pool = ["bounce", "jump", "spin", "move_left", "move_right", "move_up", "move_down"]
        else:
            continue
        picks = rng.sample(pool, 3)
        q = f"What does {_name(o)} do in the video?"
        yield _Draft("motion_type", "MR", q, MOTION_TYPE_OPTIONS[t], tuple(MOTION_TYPE_OPTIONS[p] for p in picks))


def _implied(action: str, performed: set[str]) -> bool:
    """An action a viewer could claim to have seen because a performed action contains it."""
    if action in ("move_up", "move_down") and "jump" in performed:
        return True
    return action == "jump" and bool({"move_up", "move_down"} & performed)


def _action_order(truth: dict[str, Any], rng: random.Random) -> Iterable[_Draft]:
    for o in _askable(truth):
        m = o["motion"]
        if m["type"] != "sequence" or len(m["actions"]) != 2:
            continue
        a1, a2 = m["actions"]
        performed = {a1, a2}
        unused = [a for a in ACTION_PHRASES if a not in performed and not _implied(a, performed)]

        def say(x: str, y: str) -> str:
            return f"It first {ACTION_PHRASES[x]}, then {ACTION_PHRASES[y]}"

        pairs = [(a1, c) for c in unused] + [(c, a2) for c in unused] + [(c, a1) for c in unused]
        pairs += [(a2, c) for c in unused]
        wrong = sorted({say(x, y) for x, y in pairs})
        if len(wrong) < 2:
            continue
        distractors = (say(a2, a1), *rng.sample(wrong, 2))
        q = f"What does {_name(o)} do, and in which order?"
        yield _Draft("action_order", "AO", q, say(a1, a2), distractors)


def _start_order(truth: dict[str, Any], rng: random.Random) -> Iterable[_Draft]:
    movers = [o for o in _askable(truth) if not o["static"] and o["motion"].get("start_frame") is not None]
    pairs = [
        (a, b)
        for i, a in enumerate(movers)
        for b in movers[i + 1 :]
        if abs(a["motion"]["start_frame"] - b["motion"]["start_frame"]) >= MIN_START_GAP_FRAMES
    ]
    if not pairs:
        return
    a, b = rng.choice(pairs)
    if rng.random() < 0.5:
        a, b = b, a
    first = a if a["motion"]["start_frame"] < b["motion"]["start_frame"] else b
    second = b if first is a else a
    q = f"Which starts moving first, {_name(a)} or {_name(b)}?"
    yield _Draft("start_order", "AO", q, _cap(_name(first)), (_cap(_name(second)), SAME_TIME, NEITHER))


def _camera_pan(truth: dict[str, Any], rng: random.Random) -> Iterable[_Draft]:
    shots = truth["shots"]
    big = [o for o in truth["objects"] if o["too_large"]]
    for i, shot in enumerate(shots):
        lo, hi = shot["start_frame"], shot["end_frame"]
        # A planted object covering most of the frame hides the background scroll: do not ask.
        if any(lo <= f <= hi for o in big for f, *_ in o["boxes"]):
            continue
        direction = shot["camera_pan"]["direction"]
        if len(shots) == 1:
            q = "How does the camera move in this video?"
        else:
            q = (
                f"This video has {len(shots)} shots separated by hard cuts. "
                f"How does the camera move during the {ORDINALS[i] if i < len(ORDINALS) else f'{i + 1}th'} shot?"
            )
        others = [PAN_OPTIONS[d] for d in PAN_OPTIONS if d != direction]
        yield _Draft("camera_pan", "CM", q, PAN_OPTIONS[direction], tuple(rng.sample(others, 3)))


def _absent_names(truth: dict[str, Any], rng: random.Random, k: int) -> list[str]:
    used_colors = {o["color"] for o in truth["objects"]}
    names = [
        f"The {c} {cat}" for c in _FILLER_COLORS if c not in used_colors for cat in _FILLER_CATEGORIES
    ]
    return rng.sample(names, k)


def _which_object(truth: dict[str, Any], rng: random.Random, answer: dict, wrong: list[dict]) -> tuple[str, tuple]:
    picks = rng.sample(wrong, min(3, len(wrong)))
    options = [_cap(_name(o)) for o in picks]
    options += _absent_names(truth, rng, 3 - len(options))
    return _cap(_name(answer)), tuple(options)


def _static_object(truth: dict[str, Any], rng: random.Random) -> Iterable[_Draft]:
    objs = _askable(truth)
    still = [o for o in objs if o["static"]]
    if len(still) != 1:
        return
    correct, distractors = _which_object(truth, rng, still[0], [o for o in objs if not o["static"]])
    yield _Draft("static_object", "MO", "Which of these objects never moves during the video?", correct, distractors)


def _moving_object(truth: dict[str, Any], rng: random.Random) -> Iterable[_Draft]:
    objs = _askable(truth)
    candidates = []
    for d in DIRECTION_WORDS:
        having = [o for o in objs if d in _direction_set(o)]
        if len(having) == 1:
            candidates.append((d, having[0]))
    if not candidates:
        return
    d, obj = rng.choice(candidates)
    correct, distractors = _which_object(truth, rng, obj, [o for o in objs if d not in _direction_set(o)])
    q = f"Which of these objects moves {DIRECTION_WORDS[d]} at some point in the video?"
    yield _Draft("moving_object", "MO", q, correct, distractors)


_BUILDERS = (
    _repetition_count,
    _motion_direction,
    _motion_type,
    _action_order,
    _start_order,
    _camera_pan,
    _static_object,
    _moving_object,
)


def questions_from_truth(truth: dict[str, Any], seed: int) -> list[SynthQuestion]:
    """All unambiguous questions for one synthetic video, answer letters balanced and shuffled by `seed`.

    `truth` is the ground-truth JSON of :mod:`stages.synth.videos` (version 1). Same (truth, seed) => same list.
    """
    if truth.get("version") != 1:
        raise ValueError(
            f"ground truth for {truth.get('video')!r} has version {truth.get('version')!r}; "
            "questions_from_truth reads version 1 (re-render with stages.synth.videos)"
        )
    # What is asked (pairs, distractors) depends on the truth only; `seed` only orders the options.
    pick = random.Random(f"questions\x1f{truth['video']}\x1f{truth['seed']}")
    drafts = [d for build in _BUILDERS for d in build(truth, pick)]
    rng = random.Random(f"{seed}\x1f{truth['video']}\x1f{truth['seed']}")
    offset = rng.randrange(4)
    questions = []
    for i, d in enumerate(drafts):
        options = list(d.distractors)
        if len(set(options) | {d.correct}) != 4:  # every builder guarantees this; fail loudly if one breaks
            raise AssertionError(f"{truth['video']}: {d.kind} question has repeated options {options + [d.correct]}")
        rng.shuffle(options)
        position = (offset + i) % 4
        options.insert(position, d.correct)
        questions.append(
            SynthQuestion(
                video=truth["video"],
                question=d.question,
                options=tuple(options),
                answer=LETTERS[position],
                category=d.category,
                kind=d.kind,
            )
        )
    return questions


def motionbench_record(questions: list[SynthQuestion], video_path: str, key: str | None = None) -> dict[str, Any]:
    """One line of MotionBench's ``video_info.meta.jsonl`` for a synthetic video's questions."""
    if not questions:
        raise ValueError(f"no questions for {video_path}; nothing to export")
    kinds = sorted({q.category for q in questions})
    return {
        "key": key or questions[0].video.rsplit(".", 1)[0],
        "video_path": video_path,
        "video_type": "virtual",
        "question_type": ",".join(kinds),
        "qa": [{"uid": q.question_id, "question": q.formatted(), "answer": q.answer} for q in questions],
    }
