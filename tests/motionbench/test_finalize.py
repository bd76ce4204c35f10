"""finalize: letter balance, split by video (the release export is tested in tests/export/)."""
from __future__ import annotations

import collections

from schemas.reviews import Review
from stages.motionbench.finalize import FinalizeConfig, assign_letters, build_benchmark, place_answer, split_by_video

LETTERS = "ABCD"
CATS = ("MR", "LM", "AO", "RC", "MO", "CM")


def _reviewed(n_videos: int, per_video: int, answer="A") -> list[Review]:
    rows = []
    for v in range(n_videos):
        for k in range(per_video):
            i = v * per_video + k
            opts = [f"right {i}", f"wrong {i} a", f"wrong {i} b", f"wrong {i} c"]
            rows.append(Review(question_id=f"q{i:04d}", clip_id=f"clip{v}", video_id=f"vid{v}",
                               video_path=f"/videos/vid{v}.mp4", start_s=1.0, end_s=4.5,
                               question=f"What happens in part {i}?", options=opts, answer=answer,
                               category=CATS[i % 6], decision="accept", reviewer="r1", review_mode="required"))
    return rows


def test_letters_balanced_on_400_questions_even_when_all_generated_answers_are_a():
    reviewed = _reviewed(100, 4, answer="A")
    original = {r.question_id: set(r.options) for r in reviewed}
    rows = build_benchmark(reviewed, [], FinalizeConfig(seed=3))
    assert len(rows) == 400
    for split in ("dev", "test", None):
        sel = [r for r in rows if split is None or r.split == split]
        counts = collections.Counter(r.answer for r in sel)
        for letter in LETTERS:
            assert abs(counts[letter] / len(sel) - 0.25) <= 0.02, (split, counts)
    for r in rows:  # the right option moved with its letter
        assert r.options[LETTERS.index(r.answer)].startswith("right ")
        assert set(r.options) == original[r.question_id] and len(r.options) == 4


def test_split_is_by_video_with_ratio_and_seed():
    rows = build_benchmark(_reviewed(40, 3), [], FinalizeConfig(seed=1, dev_ratio=0.5))
    by_video = collections.defaultdict(set)
    for r in rows:
        by_video[r.video_id].add(r.split)
    assert all(len(s) == 1 for s in by_video.values())  # never split inside a video
    n_dev = sum(r.split == "dev" for r in rows)
    assert abs(n_dev - 60) <= 3
    again = build_benchmark(_reviewed(40, 3), [], FinalizeConfig(seed=1, dev_ratio=0.5))
    assert [(r.question_id, r.split, r.answer, r.options) for r in rows] == \
           [(r.question_id, r.split, r.answer, r.options) for r in again]
    other = build_benchmark(_reviewed(40, 3), [], FinalizeConfig(seed=2, dev_ratio=0.5))
    assert {r.question_id: r.split for r in rows} != {r.question_id: r.split for r in other}
    s = split_by_video({"a": 10, "b": 10, "c": 10, "d": 10}, 0.25, 0)
    assert collections.Counter(s.values()) == {"dev": 1, "test": 3}


def test_assign_letters_and_place_answer():
    letters = assign_letters([f"q{i}" for i in range(10)], 0)
    assert sorted(collections.Counter(letters.values()).values()) == [2, 2, 3, 3]
    opts = place_answer(["w", "x", "y", "z"], "C", "A", 0, "q")
    assert opts[0] == "y" and sorted(opts) == ["w", "x", "y", "z"]


def test_split_with_unequal_question_counts_replays_the_rule():
    """Videos with 1 to 12 questions: the split equals an independent replay of the documented rule (videos
    in sha256(seed, "split", video) order; a video joins dev while dev + half its questions stays at or under
    dev_ratio x total), every video lands in exactly one split, and dev overshoots its target by at most half
    of the largest video."""
    import hashlib

    counts = {"v0": 1, "v1": 12, "v2": 3, "v3": 7, "v4": 2, "v5": 9, "v6": 1, "v7": 5, "v8": 11, "v9": 4}
    for seed in range(25):
        for ratio in (0.3, 0.5):
            got = split_by_video(counts, ratio, seed)
            order = sorted(counts, key=lambda v: hashlib.sha256(f"{seed}\x1fsplit\x1f{v}".encode()).hexdigest())
            target, dev, want = ratio * sum(counts.values()), 0, {}
            for v in order:
                want[v] = "dev" if dev + counts[v] / 2 <= target else "test"
                dev += counts[v] if want[v] == "dev" else 0
            assert got == want, (seed, ratio)
            assert dev <= target + max(counts.values()) / 2
    # The edge: a video whose half lands exactly on the target joins dev (<=, not <).
    s = split_by_video({"a": 4, "b": 4}, 0.25, 0)
    assert sorted(s.values()) == ["dev", "test"]
