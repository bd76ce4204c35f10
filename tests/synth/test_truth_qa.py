"""Questions from synthetic ground truth: every answer re-derived here from the JSON, mostly from the boxes."""
from __future__ import annotations

import collections
import json
import re

import numpy as np
import pytest

from stages.synth.videos import SynthConfig, render_frames
from stages.synth.truth_qa import CATEGORIES, LETTERS, SynthQuestion, motionbench_record, questions_from_truth

SMALL = SynthConfig(width=160, height=120, object_size_px=(16, 24), min_duration_s=2.4, max_duration_s=3.2)
KINDS = {
    "repetition_count": "RC",
    "motion_direction": "LM",
    "motion_type": "MR",
    "action_order": "AO",
    "start_order": "AO",
    "camera_pan": "CM",
    "static_object": "MO",
    "moving_object": "MO",
}


@pytest.fixture(scope="module")
def truths() -> list[dict]:
    cfg = SMALL.model_copy(update={"too_large_probability": 0.5})
    # Through JSON text, exactly as a later stage reads the files.
    return [json.loads(json.dumps(render_frames(s, cfg)[0].to_json_dict())) for s in range(14)]


# ---- the truth side, computed independently of stages.synth.truth_qa -------------------------------------


def _named(truth: dict, text: str) -> list[dict]:
    """Objects named in `text` as '<color> <category>', in order of appearance."""
    hits = []
    for o in truth["objects"]:
        m = re.search(rf"\b{o['color']} {o['category']}\b", text, flags=re.I)
        if m:
            hits.append((m.start(), o))
    return [o for _, o in sorted(hits, key=lambda h: h[0])]


def _series(o: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b = np.array(o["boxes"], dtype=float)
    return b[:, 0], (b[:, 1] + b[:, 3]) / 2, (b[:, 2] + b[:, 4]) / 2


def _max_rise(v: np.ndarray) -> float:
    return float(np.max(v - np.minimum.accumulate(v)))


def _moves(o: dict, direction: str, px: float = 8.0) -> bool:
    _, cx, cy = _series(o)
    v = {"right": cx, "left": -cx, "down": cy, "up": -cy}[direction]
    return _max_rise(v) >= px


def _first_motion_frame(o: dict) -> int | None:
    b = np.array(o["boxes"])
    changed = np.flatnonzero((b[:, 1:] != b[0, 1:]).any(axis=1))
    return int(b[changed[0], 0]) if len(changed) else None


def _wall_hits(o: dict) -> int:
    _, cx, _ = _series(o)
    signs = [np.sign(d) for d in np.diff(cx) if d != 0]
    return sum(1 for a, b in zip(signs, signs[1:]) if a != b)


def _hops(o: dict) -> int:
    b = np.array(o["boxes"])
    up = b[:, 2] < b[0, 2] - 1
    return int(np.sum(up[1:] & ~up[:-1]) + up[0])


def _motion_kind(o: dict) -> str:
    _, cx, cy = _series(o)
    xr, yr = np.ptp(cx), np.ptp(cy)
    if xr == 0 and yr == 0:
        return "still"
    if xr >= 20 and yr <= 1 and _wall_hits(o) >= 1:
        return "bounce"
    if yr >= 15 and xr <= 1 and _hops(o) >= 2:
        return "jump"
    return "other"


KEYWORDS = {"left": "left", "right": "right", "up": "upward", "down": "downward", "none": "not move"}
ACTION_WORDS = {
    "move_left": "moves to the left",
    "move_right": "moves to the right",
    "move_up": "moves up",
    "move_down": "moves down",
    "jump": "jumps",
    "spin": "spins",
}


def _check(truth: dict, q: SynthQuestion) -> None:
    ans = q.options[LETTERS.index(q.answer)]
    wrong = [o for o in q.options if o != ans]
    named = _named(truth, q.question)
    assert not any(o["too_large"] for o in named), q
    if q.kind == "repetition_count":
        (o,) = named
        count = _wall_hits(o) if "wall" in q.question else _hops(o)
        assert count >= 1 and ans == str(count), (q, count)
    elif q.kind == "motion_direction":
        (o,) = named
        dirs = [d for d in ("left", "right", "up", "down") if _moves(o, d)]
        assert len(dirs) == 1, (q, dirs)
        assert KEYWORDS[dirs[0]] in ans.lower() and not any(KEYWORDS[dirs[0]] in w.lower() for w in wrong)
    elif q.kind == "motion_type":
        (o,) = named
        kind = _motion_kind(o)
        word = {"still": "still", "bounce": "bounces", "jump": "jumps"}[kind]
        assert word in ans and not any(word in w for w in wrong), (q, kind)
    elif q.kind == "action_order":
        (o,) = named
        names = [e["name"] for e in sorted(truth["events"], key=lambda e: e["start_frame"]) if e["object_id"] == o["object_id"]]
        assert len(names) == 2
        p1, p2 = ACTION_WORDS[names[0]], ACTION_WORDS[names[1]]
        assert p1 in ans and p2 in ans and ans.index(p1) < ans.index(p2), (q, names)
        for w in wrong:  # no distractor describes what happened
            assert not (p1 in w and p2 in w and w.index(p1) < w.index(p2)), (q, w)
        # The actions really happen in that order in the boxes: the first event's span changes the box.
        events = [e for e in truth["events"] if e["object_id"] == o["object_id"]]
        assert _first_motion_frame(o) in range(events[0]["start_frame"], events[0]["end_frame"] + 1)
    elif q.kind == "start_order":
        a, b = named
        fa, fb = _first_motion_frame(a), _first_motion_frame(b)
        assert fa is not None and fb is not None and abs(fa - fb) >= 4, (q, fa, fb)
        first = a if fa < fb else b
        assert ans.lower() == f"the {first['color']} {first['category']}", (q, fa, fb)
    elif q.kind == "camera_pan":
        ordinals = ["first", "second", "third", "fourth", "fifth"]
        m = re.search(r"during the (\w+) shot", q.question)
        shot = truth["shots"][ordinals.index(m.group(1))] if m else truth["shots"][0]
        if not m:
            assert len(truth["shots"]) == 1
        direction = shot["camera_pan"]["direction"]
        assert KEYWORDS[direction] in ans.lower() and not any(KEYWORDS[direction] in w.lower() for w in wrong)
        assert (direction == "none") == (shot["camera_pan"]["speed_px_per_frame"] == 0)
        assert not any(
            shot["start_frame"] <= f <= shot["end_frame"] for o in truth["objects"] if o["too_large"] for f, *_ in o["boxes"]
        ), "pan question on a shot hidden by a too-large object"
    elif q.kind == "static_object":
        still = [o for o in truth["objects"] if not o["too_large"] and _motion_kind(o) == "still"]
        assert len(still) == 1
        assert ans.lower() == f"the {still[0]['color']} {still[0]['category']}"
        for w in wrong:
            for o in _named(truth, w):
                assert _motion_kind(o) != "still"
    elif q.kind == "moving_object":
        d = {"leftward": "left", "rightward": "right", "upward": "up", "downward": "down"}[
            re.search(r"moves (\w+ward)", q.question).group(1)
        ]
        movers = [o for o in truth["objects"] if not o["too_large"] and _moves(o, d)]
        assert len(movers) == 1, (q, movers)
        assert ans.lower() == f"the {movers[0]['color']} {movers[0]['category']}"
        for w in wrong:
            for o in _named(truth, w):
                assert not _moves(o, d)
    else:
        raise AssertionError(f"unknown kind {q.kind}")


# ---- tests -------------------------------------------------------------------------------------------


def test_every_answer_matches_the_truth(truths):
    kinds = collections.Counter()
    for truth in truths:
        questions = questions_from_truth(truth, seed=0)
        assert questions, truth["video"]
        for q in questions:
            _check(truth, q)
            kinds[q.kind] += 1
    assert set(kinds) == set(KINDS), kinds  # every kind is exercised and checked


def test_shape_of_questions(truths):
    for truth in truths:
        for q in questions_from_truth(truth, seed=1):
            assert q.video == truth["video"]
            assert len(q.options) == 4 and len(set(q.options)) == 4 and all(o.strip() for o in q.options)
            assert q.answer in LETTERS
            assert q.category in CATEGORIES and KINDS[q.kind] == q.category
            assert q.question.endswith("?")


def test_no_questions_where_the_truth_is_ambiguous(truths):
    for truth in truths:
        for q in questions_from_truth(truth, seed=2):
            named = _named(truth, q.question)
            if q.kind == "motion_direction":
                assert all(not o["static"] and o["motion"]["type"] == "linear" for o in named)
            if q.kind == "repetition_count":
                assert all(o["motion"]["repetitions"] >= 1 for o in named)
            for option in q.options:  # options never name the planted too-large object
                assert not any(o["too_large"] for o in _named(truth, option))


def test_answer_letters_are_close_to_uniform(truths):
    letters = collections.Counter(q.answer for seed in range(4) for t in truths for q in questions_from_truth(t, seed))
    total = sum(letters.values())
    assert total >= 200
    for letter in LETTERS:
        assert 0.2 <= letters[letter] / total <= 0.3, letters


def test_deterministic_and_seed_dependent(truths):
    t = truths[0]
    assert questions_from_truth(t, 5) == questions_from_truth(t, 5)
    other = [questions_from_truth(t, s) for s in range(6, 10)]
    assert any([q.options for q in o] != [q.options for q in questions_from_truth(t, 5)] for o in other)
    # The same questions and option sets whatever the seed; only the option order changes.
    base = questions_from_truth(t, 5)
    for o in other:
        assert [(q.question, set(q.options), q.answer_text) for q in o] == [
            (q.question, set(q.options), q.answer_text) for q in base
        ]


def test_static_camera_shot_answers_does_not_move():
    cfg = SMALL.model_copy(update={"static_camera_probability": 1.0, "too_large_probability": 0.0})
    truth = render_frames(4, cfg)[0].to_json_dict()
    pans = [q for q in questions_from_truth(truth, 0) if q.kind == "camera_pan"]
    assert len(pans) == len(truth["shots"])
    assert all(q.answer_text == "It does not move" for q in pans)


def test_version_mismatch_is_refused(truths):
    bad = dict(truths[0], version=2)
    with pytest.raises(ValueError, match="version"):
        questions_from_truth(bad, 0)


def test_motionbench_record_format(truths):
    qs = questions_from_truth(truths[0], 0)
    rec = motionbench_record(qs, "virtual/" + truths[0]["video"])
    assert rec["video_type"] == "virtual" and rec["key"] == truths[0]["video"].rsplit(".", 1)[0]
    assert len(rec["qa"]) == len(qs) and len({qa["uid"] for qa in rec["qa"]}) == len(qs)
    first = rec["qa"][0]
    lines = first["question"].split("\n")
    assert lines[0] == qs[0].question and [l[:3] for l in lines[1:]] == ["A. ", "B. ", "C. ", "D. "]
    assert first["answer"] == qs[0].answer
    assert qs[0].question_id == questions_from_truth(truths[0], 0)[0].question_id
