"""synthqa -> finalize: questions from synthetic ground truth keep the truth's answer through option balancing."""
from __future__ import annotations

import json

from schemas._base import from_table
from schemas.motionbench import SCHEMA as MB_SCHEMA, BenchmarkQuestion
from schemas.questions import SCHEMA as Q_SCHEMA, Question
from schemas.reviews import SCHEMA as REVIEW_SCHEMA
from stages.motionbench import finalize
from stages.synth import synthqa
from stages.runner import run_shard
from stages.synth.videos import SynthConfig, render_frames
from stages.synth.truth_qa import DIRECTION_OPTIONS, MOTION_TYPE_OPTIONS, PAN_OPTIONS, questions_from_truth
from storage.root import OutputRoot
from tests._mb_doubles import make_plan, seed_stage, seed_videos, video_row

SMALL = SynthConfig(width=96, height=96, min_duration_s=2.0, max_duration_s=2.5, object_size_px=(12, 16),
                    min_shot_frames=10, max_pan_speed_px_per_frame=2)


def _object(truth, name):
    return next(o for o in truth["objects"] if f"the {o['color']} {o['category']}" in name.lower())


def _truth_answer(truth: dict, kind: str, question: str) -> str | None:
    """The right option text computed here from the truth JSON, for the kinds whose rule is simple."""
    if kind == "repetition_count":
        return str(_object(truth, question)["motion"]["repetitions"])
    if kind == "motion_direction":
        return DIRECTION_OPTIONS[_object(truth, question)["motion"]["direction"]]
    if kind == "motion_type":
        return MOTION_TYPE_OPTIONS[_object(truth, question)["motion"]["type"]]
    if kind == "camera_pan":
        shots = truth["shots"]
        if len(shots) == 1:
            return PAN_OPTIONS[shots[0]["camera_pan"]["direction"]]
        ordinal = question.split("during the ")[1].split(" shot")[0]
        idx = ("first", "second", "third", "fourth", "fifth").index(ordinal)
        return PAN_OPTIONS[shots[idx]["camera_pan"]["direction"]]
    return None


def test_synthetic_answers_match_truth(tmp_path):
    root = OutputRoot(tmp_path / "out")
    truths, videos = {}, {0: [], 1: []}
    for i in range(6):
        path = tmp_path / f"synth_{i}.mp4"
        gt, _ = render_frames(100 + i, SMALL, path.name)
        truth = gt.to_json_dict()
        path.with_suffix(".json").write_text(json.dumps(truth))
        path.write_bytes(b"")  # synthqa reads only the truth beside the video
        truths[f"vid{i}"] = truth
        videos[i % 2].append(video_row(path, f"vid{i}", i % 2, truth["num_frames"] / truth["fps"]))
    real = tmp_path / "real.mp4"
    videos[0].append(video_row(real, "vid-real", 0, 3.0))  # no truth beside it
    make_plan(root, {k: [v.path for v in vs] for k, vs in videos.items()})
    seed_videos(root, videos)
    for s in (0, 1):
        run_shard(synthqa.STAGE, root, synthqa.SynthqaConfig(seed=7), s)
    rows = from_table(root.read_stage("synthqa", Q_SCHEMA), Question)
    skipped = [r for r in rows if r.status == "skipped"]
    assert len(skipped) == 1 and skipped[0].video_id == "vid-real" and "not a synthetic video" in skipped[0].error
    ok = [r for r in rows if r.ok]
    assert len(ok) >= 30 and {r.source for r in ok} == {"synthetic"}

    # the generator's own answers for the same (truth, seed)
    expected = {}
    for vid, truth in truths.items():
        for sq in questions_from_truth(truth, 7):
            expected[(vid, sq.question)] = (sq.answer_text, sq.kind, sq.category)

    # finalize needs a (here empty) review table too
    seed_stage(root, "review", REVIEW_SCHEMA, {0: [], 1: []})
    run_shard(finalize.STAGE, root, finalize.FinalizeConfig(seed=1), 0)
    final = from_table(root.read_stage("finalize", MB_SCHEMA), BenchmarkQuestion)
    assert len(final) == len(ok) and {r.video_type for r in final} == {"virtual"}
    checked_independently = 0
    for r in final:
        answer_text = r.options["ABCD".index(r.answer)]
        text, kind, category = expected[(r.video_id, r.question)]
        assert answer_text == text, (r.question, r.options, r.answer)
        assert r.category == category
        independent = _truth_answer(truths[r.video_id], kind, r.question)
        if independent is not None:
            assert answer_text == independent, (kind, r.question)
            checked_independently += 1
    assert checked_independently >= 12
