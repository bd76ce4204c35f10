"""finalize: the benchmark itself (global stage): balanced answer letters, dev/test split.

* Inputs: reviewed questions that go forward (``review``) and ground-truth questions of synthetic videos
  (``synthqa``, ``video_type="virtual"``).
* Split by **source video** (every clip and question of one video lands in the same split, so no test video
  leaks into dev), in a seeded order, filling dev up to ``dev_ratio`` of the questions (the paper's random
  dev/test halves: 4,020 / 4,034).
* Letters are assigned, not drawn: within each split the questions are put in a seeded order and question
  ``i`` gets letter ``"ABCD"[i % 4]``, so each letter's share is within one question of 25 % per split (the
  paper: options "generally adhere to a random distribution"). The correct option moves to its letter and
  the three distractors take the other places in a seeded shuffle.
* The release folder the scorers read (one question per meta line, cut clip files, the test answer key) is
  written by :mod:`stages.export.motionbench` (``motionforge export motionbench``).
"""
from __future__ import annotations

import collections
import hashlib
import random
from typing import Iterable, Sequence

from pydantic import Field

from schemas.motionbench import SCHEMA, BenchmarkQuestion
from schemas.questions import Question
from schemas.reviews import Review
from stages.base import Resources, ShardContext, Stage, StageConfig
from stages.shared.motionbench_format import CATEGORY_NAMES, LETTERS

class FinalizeConfig(StageConfig):
    seed: int = 0
    dev_ratio: float = Field(0.5, ge=0.0, le=1.0)
    include_synthetic: bool = True
    video_type_real: str = "real"
    video_type_virtual: str = "virtual"


def _rank(seed: int, *parts: str) -> str:
    return hashlib.sha256("\x1f".join((str(seed), *parts)).encode()).hexdigest()


def split_by_video(questions_per_video: dict[str, int], dev_ratio: float, seed: int) -> dict[str, str]:
    """video_id -> "dev" | "test". Videos in a seeded order; a video joins dev while that keeps dev's share
    of questions at or under ``dev_ratio`` (half a video's questions may overshoot, to stay close)."""
    total = sum(questions_per_video.values())
    target = dev_ratio * total
    dev = 0
    out = {}
    for vid in sorted(questions_per_video, key=lambda v: _rank(seed, "split", v)):
        n = questions_per_video[vid]
        if dev + n / 2 <= target:
            out[vid] = "dev"
            dev += n
        else:
            out[vid] = "test"
    return out


def assign_letters(question_ids: Sequence[str], seed: int) -> dict[str, str]:
    """Balanced letters: in a seeded order, question i gets LETTERS[i % 4]."""
    order = sorted(question_ids, key=lambda q: _rank(seed, "letter", q))
    return {q: LETTERS[i % 4] for i, q in enumerate(order)}


def place_answer(options: Sequence[str], answer: str, target: str, seed: int, qid: str) -> list[str]:
    """Options with the correct one moved to ``target`` and the distractors shuffled into the rest."""
    if len(options) != 4 or answer not in LETTERS:
        raise ValueError(f"question {qid}: needs four options and an answer letter, got {len(options)} / {answer!r}")
    correct = options[LETTERS.index(answer)]
    distractors = [o for i, o in enumerate(options) if i != LETTERS.index(answer)]
    random.Random(_rank(seed, "options", qid)).shuffle(distractors)
    distractors.insert(LETTERS.index(target), correct)
    return distractors


def build_benchmark(reviewed: Iterable[Review], synthetic: Iterable[Question], cfg: FinalizeConfig) -> list[BenchmarkQuestion]:
    items: list[dict] = []
    for r in reviewed:
        items.append(dict(qid=r.question_id, key=r.clip_id, video_id=r.video_id, clip_path=r.clip_path,
                          video_path=r.video_path, start_s=r.start_s, end_s=r.end_s, question=r.question,
                          options=list(r.options or []), answer=r.answer, category=r.category,
                          video_type=cfg.video_type_real, source="generated"))
    if cfg.include_synthetic:
        for q in synthetic:
            items.append(dict(qid=q.question_id, key=q.clip_id, video_id=q.video_id, clip_path=q.clip_path,
                              video_path=q.video_path, start_s=q.start_s, end_s=q.end_s, question=q.question,
                              options=list(q.options or []), answer=q.answer, category=q.category,
                              video_type=cfg.video_type_virtual, source="synthetic"))
    seen: set[str] = set()
    unique = []
    for it in items:
        if it["qid"] in seen:
            raise ValueError(f"question {it['qid']} arrives twice (review and synthqa?); question ids must be unique")
        seen.add(it["qid"])
        unique.append(it)
    per_video = collections.Counter(it["video_id"] for it in unique)
    split = split_by_video(dict(per_video), cfg.dev_ratio, cfg.seed)
    letters: dict[str, str] = {}
    for s in ("dev", "test"):
        letters.update(assign_letters([it["qid"] for it in unique if split[it["video_id"]] == s], cfg.seed))
    rows = []
    for it in unique:
        whole_file = it["clip_path"] is not None
        rows.append(BenchmarkQuestion(
            question_id=it["qid"], key=it["key"], video_id=it["video_id"],
            video_path=it["clip_path"] or it["video_path"],
            start_s=None if whole_file else it["start_s"], end_s=None if whole_file else it["end_s"],
            video_type=it["video_type"], category=it["category"], question_type=CATEGORY_NAMES[it["category"]],
            question=it["question"],
            options=place_answer(it["options"], it["answer"], letters[it["qid"]], cfg.seed, it["qid"]),
            answer=letters[it["qid"]], split=split[it["video_id"]], source=it["source"]))
    rows.sort(key=lambda r: (r.split, r.key, r.question_id))
    return rows


def process(ctx: ShardContext) -> list[BenchmarkQuestion]:
    cfg: FinalizeConfig = ctx.config
    reviewed = ctx.read_records("review", Review)
    synthetic = ctx.read_records("synthqa", Question)
    return build_benchmark(reviewed, synthetic, cfg)


STAGE = Stage(
    name="finalize", schema=SCHEMA, inputs=("review", "synthqa"), config_cls=FinalizeConfig, process=process,
    expert=lambda cfg: ("motionbench-finalize", None), resources=Resources(cpus=0.5), scope="global",
    branch="motionbench", description="balanced letters, dev/test split by video, official export",
)

