"""synthqa: questions from a synthetic video's ground truth alone (MotionBench 3.1, "virtual videos").

"For virtual videos, where we already possess the ground truth annotations for each query, we automatically
construct the questions and corresponding options." Every video that ``ingest`` accepted and that has a
:mod:`stages.synth.videos` ground-truth JSON beside it gets the questions of
:func:`stages.synth_qa.questions_from_truth` (repetition count, direction, order of actions, camera pan, ...),
each correct by construction. They skip describe / qgen / ffilter / review and go straight to ``finalize``
as ``video_type="virtual"``. Videos without ground truth are one skipped row each.
"""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from schemas._base import STATUS_ERROR, STATUS_SKIPPED
from schemas.questions import SCHEMA, Question
from schemas.videos import Video
from stages.base import Resources, ShardContext, Stage, StageConfig
from stages.shared.motionbench_questions import failure_id, normalise, question_id

LETTERS = ("A", "B", "C", "D")


class SynthqaConfig(StageConfig):
    seed: int = Field(0, description="seed of option shuffling inside questions_from_truth")


def truth_path(video_path: str) -> Path:
    return Path(video_path).with_suffix(".json")


def questions_for_video(v: Video, truth: dict, seed: int) -> list[Question]:
    from stages.synth.truth_qa import questions_from_truth

    clip_id = v.video_id  # the whole video is the unit: the truth describes the whole video
    end_s = float(v.duration_s or (truth["num_frames"] / truth["fps"]))
    base = dict(clip_id=clip_id, video_id=v.video_id, video_path=v.path, start_s=0.0, end_s=end_s, source="synthetic")
    rows, seen = [], set()
    for i, sq in enumerate(questions_from_truth(truth, seed)):
        key = normalise(sq.question)
        if key in seen:
            rows.append(Question(question_id=failure_id(clip_id, f"duplicate#{i}"), **base, question=sq.question,
                                 kind=sq.kind, generation_index=i, status=STATUS_ERROR,
                                 error=f"synthetic video {v.path}: question text repeats an earlier one ({sq.question!r})"))
            continue
        seen.add(key)
        rows.append(Question(question_id=question_id(clip_id, sq.question), **base, question=sq.question,
                             options=list(sq.options), answer=sq.answer, category=sq.category, kind=sq.kind,
                             generation_index=i))
    return rows


def rows_for_video(v: Video, seed: int) -> list[Question]:
    tp = truth_path(v.path)
    base = dict(clip_id=v.video_id, video_id=v.video_id, video_path=v.path, start_s=0.0,
                end_s=float(v.duration_s or 0.0), source="synthetic")
    if not tp.is_file():
        return [Question(question_id=failure_id(v.video_id, "no-truth"), **base, status=STATUS_SKIPPED,
                         error=f"no ground truth {tp.name} beside the video: not a synthetic video")]
    try:
        truth = json.loads(tp.read_text())
        if truth.get("video") not in (None, Path(v.path).name):
            raise ValueError(f"it describes {truth.get('video')!r}, not {Path(v.path).name!r}")
        return questions_for_video(v, truth, seed)
    except Exception as exc:  # noqa: BLE001 -- one broken truth file is one error row
        return [Question(question_id=failure_id(v.video_id, "bad-truth"), **base, status=STATUS_ERROR,
                         error=f"ground truth {tp} cannot be used: {type(exc).__name__}: {exc}; "
                               "re-render the video with `motionforge synth`")]


def process(ctx: ShardContext) -> list[Question]:
    videos = ctx.read_records("ingest", Video)
    rows: list[Question] = []
    for i, v in enumerate(videos):
        rows += rows_for_video(v, ctx.config.seed)
        ctx.progress(i + 1, len(videos))
    return rows


STAGE = Stage(
    name="synthqa", schema=SCHEMA, inputs=("ingest",), config_cls=SynthqaConfig, process=process,
    expert=lambda cfg: ("synth-ground-truth", None), resources=Resources(cpus=0.25), branch="motionbench",
    description="questions built from synthetic videos' ground truth (MotionBench virtual videos)",
)
