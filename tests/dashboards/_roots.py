"""Output roots for the review server and explorer tests, seeded through the real runner (tables + markers).

* :func:`motionbench_root`: one real video (ffmpeg testsrc, 4 s) and questions on the clip [1 s, 2 s] of it,
  kept or dropped by two first-frame judges, as qgen and ffilter would have written them.
* :func:`imove_root`: one synthetic video (stages.synth.videos, with ground-truth boxes) whose moving objects
  are detected, tracked (the track is the ground truth), captioned and checked; the real ``tasks`` stage
  writes the three samples. A second instance is dropped at trackfilter with a reason.
"""
from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

from schemas.captions import SCHEMA as CAPTION_SCHEMA, Caption
from schemas.caption_verdicts import SCHEMA as CHECK_SCHEMA, CaptionVerdict
from schemas.ffilter_verdicts import SCHEMA as FF_SCHEMA, FilterVerdict
from schemas.instances import SCHEMA as DETECT_SCHEMA, Instance
from schemas.questions import SCHEMA as Q_SCHEMA, Question
from schemas.track_verdicts import SCHEMA as TF_SCHEMA, TrackVerdict
from schemas.tracks import SCHEMA as TRACK_SCHEMA, Track
from stages.imove_it import tasks
from stages.runner import run_shard
from stages.shared.motionbench_questions import question_id
from stages.synth.videos import SynthConfig, render_video
from storage.manifest import read_plan, record_plan
from storage.root import OutputRoot
from tests._mb_doubles import clip_for, seed_clips, seed_stage
from tests._video_fixtures import make_testsrc

CLIP_START_S, CLIP_END_S = 1.0, 2.0

# (stem, options, proposed answer, category, judge answers j1/j2); ffilter keeps a question unless both are right
MB_QUESTIONS = [
    ("How many times does the ball bounce?", ["Once", "Twice", "Three times", "Four times"], "B", "RC", ("A", "B")),
    ("Which way does the counter move?", ["Left", "Right", "Up", "Down"], "C", "LM", ("A", "D")),
    ("What does the person do first?", ["Wave", "Sit", "Jump", "Clap"], "A", "AO", ("A", "C")),
    ("What color is the top bar?", ["White", "Black", "Red", "Blue"], "A", "MO", ("A", "A")),  # dropped
]


def extra_questions(n: int) -> list[tuple]:
    """``n`` more pending questions (one judge right) for tests that need a longer queue."""
    return [(f"How many times does light {k} blink?", ["Once", "Twice", "Three times", "Never"], "C", "RC", ("C", "A"))
            for k in range(n)]


def motionbench_root(tmp: Path, extra: int = 0) -> tuple[OutputRoot, dict[str, tuple]]:
    """Returns the root and question_id -> its entry of MB_QUESTIONS (+ ``extra`` more); all but
    MB_QUESTIONS[3] are pending review. The source video is 6 s long; every question is about [1 s, 2 s]."""
    video = make_testsrc(tmp / "source.mp4", width=320, height=240, duration_s=6.0)
    root = OutputRoot(tmp / "root")
    clip = clip_for(video, "vid-src", 0, CLIP_START_S, CLIP_END_S)
    clip = dataclasses.replace(clip, width=320, height=240)
    seed_clips(root, {0: [clip]})
    questions, verdicts, by_id = [], [], {}
    for i, entry in enumerate(MB_QUESTIONS + extra_questions(extra)):
        stem, options, answer, category, judged = entry
        qid = question_id(clip.clip_id, stem)
        by_id[qid] = entry
        questions.append(Question(question_id=qid, clip_id=clip.clip_id, video_id=clip.video_id,
                                  video_path=str(video), start_s=CLIP_START_S, end_s=CLIP_END_S, source="vlm",
                                  question=stem, options=options, answer=answer, category=category,
                                  generation_index=i, kind="real"))
        n_correct = sum(a == answer for a in judged)
        for name, a in zip(("j1", "j2"), judged):
            verdicts.append(FilterVerdict(question_id=qid, clip_id=clip.clip_id, row_kind="verdict", judge=name,
                                          judge_model=f"fake-{name}", answer_letter=a, raw_reply=f"The answer is {a}.",
                                          correct=a == answer))
        kept = n_correct < 2
        verdicts.append(FilterVerdict(question_id=qid, clip_id=clip.clip_id, row_kind="decision", judge="all",
                                      n_judges=2, n_correct=n_correct, kept=kept,
                                      status="ok" if kept else "skipped",
                                      error=None if kept else "every first-frame judge answered it"))
    seed_stage(root, "qgen", Q_SCHEMA, {0: questions})
    seed_stage(root, "ffilter", FF_SCHEMA, {0: verdicts})
    return root, by_id


def imove_root(tmp: Path) -> tuple[OutputRoot, dict]:
    """Returns the root and {"kept": (instance, track), "dropped": (instance, reason)}."""
    cfg = SynthConfig(min_duration_s=3.0, max_duration_s=3.0, min_shots=1, max_shots=1, too_large_probability=0.0,
                      static_camera_probability=1.0)
    video = tmp / "synth_0.mp4"
    truth = render_video(video, seed=11, config=cfg)
    fps = float(truth.fps)
    root = OutputRoot(tmp / "root")
    n = truth.num_frames
    clip = clip_for(video, "synth-0", 0, 0.0, n / fps)
    clip = dataclasses.replace(clip, width=truth.width, height=truth.height, end_frame=n)
    seed_clips(root, {0: [clip]})
    moving = [o for o in truth.objects if not o.static and len(o.boxes) == n]
    assert len(moving) >= 2, "the synthetic video should have two objects visible in every frame"
    instances, track_rows, tf_rows = [], [], []
    for k, obj in enumerate(moving[:2]):
        box0 = [float(v) for v in obj.boxes[0][1:]]
        inst = Instance(instance_id=f"inst-{k}", clip_id=clip.clip_id, video_id=clip.video_id, video_path=str(video),
                        start_frame=0, end_frame=n, start_s=0.0, end_s=n / fps, duration_s=n / fps, fps=fps,
                        width=truth.width, height=truth.height, frame_t_s=0.0, label=obj.category,
                        tag_score=0.9, box_xyxy_px=box0, detection_score=0.8 - 0.1 * k, area_ratio=0.02,
                        clip_score=0.31)
        instances.append(inst)
        points = [{"t_s": b[0] / fps, "frame_index": b[0], "box_xyxy_px": [float(v) for v in b[1:]], "visible": True,
                   "mask_area_px": 100, "object_score": 8.0, "kf_score": 0.9} for b in obj.boxes]
        track_rows.append(Track(instance_id=inst.instance_id, clip_id=clip.clip_id, video_id=clip.video_id,
                                video_path=str(video), label=obj.category, start_s=0.0, end_s=n / fps,
                                duration_s=n / fps, first_box_xyxy_px=box0, num_frames=n, num_visible=n,
                                points=points, width=truth.width, height=truth.height, track_fps=fps))
        dropped = k == 1
        reason = "mean CLIP score 0.050 < 0.200 over 4 sampled frames" if dropped else None
        tf_rows.append(TrackVerdict(instance_id=inst.instance_id, clip_id=clip.clip_id, video_id=clip.video_id,
                                    label=obj.category, kept=not dropped, clip_scores=[0.31, 0.3],
                                    clip_sample_t_s=[0.0, 1.0], reason=reason, mean_clip_score=0.305,
                                    status="skipped" if dropped else "ok", error=reason))
    seed_stage(root, "detect", DETECT_SCHEMA, {0: instances})
    seed_stage(root, "track", TRACK_SCHEMA, {0: track_rows})
    seed_stage(root, "trackfilter", TF_SCHEMA, {0: tf_rows})
    kept, kept_track = instances[0], track_rows[0]
    t1, t2 = 0.4, 2.4
    f1, f2 = round(t1 * fps), round(t2 * fps)
    cap = Caption(instance_id=kept.instance_id, clip_id=clip.clip_id, video_id=clip.video_id, video_path=str(video),
                  label=kept.label, clip_start_s=0.0, clip_end_s=n / fps, width=truth.width, height=truth.height,
                  t1_s=t1, t2_s=t2, box1_xyxy_px=kept_track.points[f1]["box_xyxy_px"],
                  box2_xyxy_px=kept_track.points[f2]["box_xyxy_px"], prompt_version="fixture", frame_times_s=[t1, t2],
                  static_caption=f"a {kept.label} on a textured background",
                  dynamic_caption=f"the {kept.label} moves across the frame")
    seed_stage(root, "caption", CAPTION_SCHEMA, {0: [cap]})
    seed_stage(root, "check", CHECK_SCHEMA, {0: [CaptionVerdict(
        instance_id=kept.instance_id, clip_id=clip.clip_id, accepted=True, prompt_version="fixture", correct=True,
        unique=True, reason="the caption matches the motion", raw_reply="yes")]})
    run_shard(tasks.STAGE, root, tasks.TasksConfig(), 0)
    return root, {"kept": (kept, kept_track), "dropped": (instances[1], tf_rows[1].reason), "video": video,
                  "truth": truth}


COPIES = 4
BROKEN = 2  # this copy's rows are all error rows, one message per row
ID_COLUMNS = ("video_id", "clip_id", "instance_id", "sample_id", "question_id", "key")


def spread(src: OutputRoot, dest: OutputRoot) -> None:
    """``dest``: every stage of ``src`` (one shard each) as COPIES shards with ids suffixed ``~k``; copy BROKEN's
    rows are all error rows, one message per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    plan = read_plan(src)
    record_plan(dest, {**plan, "shards": [[f"{u}~{k}" for u in plan["shards"][0]] for k in range(COPIES)]})
    for stage in src.stages_present():
        if not src.completed_shards(stage):
            continue
        table, marker = src.read_shard(stage, 0), src.read_marker(stage, 0)
        for k in range(COPIES):
            t = table
            for name in ID_COLUMNS:
                if name in t.column_names:
                    i = t.schema.get_field_index(name)
                    t = t.set_column(i, t.schema.field(i), pc.binary_join_element_wise(t[name], pa.scalar(str(k)), "~"))
            if k == BROKEN and t.num_rows:
                i = t.schema.get_field_index("status")
                t = t.set_column(i, t.schema.field(i), pa.array(["error"] * t.num_rows, pa.string()))
                i = t.schema.get_field_index("error")
                t = t.set_column(i, t.schema.field(i), pa.array(
                    [f"{stage} for item {uuid.uuid4()}: the decoder stopped at frame {r * 7}" for r in range(t.num_rows)],
                    pa.string()))
            dest.write_table_atomic(stage, k, t)
            dest.write_marker(stage, k, {**marker, "shard": k})
