"""The whole MotionBench branch through stages.runner.run_shard on a temporary output root:
describe -> qgen -> ffilter -> review (export / hand edit / import) -> finalize -> export, with test doubles
for the LLM and the VLMs and real (tiny, ffmpeg-made) videos for frames."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from experts.vlm import VlmSpec
from schemas._base import from_table
from schemas.descriptions import SCHEMA as DESC_SCHEMA, Description
from schemas.ffilter_verdicts import SCHEMA as FF_SCHEMA, FilterVerdict
from schemas.motionbench import SCHEMA as MB_SCHEMA, BenchmarkQuestion
from schemas.questions import SCHEMA as Q_SCHEMA, Question
from schemas.reviews import SCHEMA as REVIEW_SCHEMA, Review
from stages.motionbench import describe, ffilter, finalize, qgen, review
from stages.synth import synthqa
from stages.base import install_expert_override
from stages.runner import run_shard, shard_state
from storage.root import OutputRoot
from tests._mb_doubles import (
    ScriptedVlm,
    clip_for,
    question_json,
    reply,
    scripted_llm,
    seed_clips,
    seed_videos,
    video_row,
)
from tests._video_fixtures import make_testsrc, require_ffmpeg

# Judges answer from the stem's first word: EASY -> both right, HALF -> only j1 right, HARD -> both wrong.
QUESTIONS = [
    question_json("EASY: what color is the top bar?", ["White", "Black", "Red", "Blue"], "A", "5.2", 4),
    question_json("HALF: how many times does the pattern flash?", ["Never", "Once", "Twice", "Three times"],
                  "C", "2.2", 2),
    question_json("HARD: in which direction does the counter move?", ["Left", "Right", "Up", "Down"], "B", "2.1", 1),
]
BAD_FIRST = question_json("HALF: bad options", ["Once", "Once", "Twice", "Never"], "A", "2.2", 2)


def _judge(name: str):
    def answer(req):
        assert len(req.images) == 1 and not req.as_video, "a first-frame judge must see exactly one image"
        stem, *opts = req.text.split("\n")
        kind = stem.split(":")[0]
        right = next(q["answer"] for q in QUESTIONS if q["question"] == stem.strip())
        wrong = "D" if right != "D" else "A"
        if kind == "EASY" or (kind == "HALF" and name == "j1"):
            return f"({right}) looks right" if name == "j1" else f"The answer is {right}."
        return wrong
    return ScriptedVlm(answer, name)


@pytest.fixture()
def mb_root(tmp_path):
    require_ffmpeg()
    va = make_testsrc(tmp_path / "va.mp4", duration_s=2.0)
    vb = make_testsrc(tmp_path / "vb.mp4", duration_s=1.2)
    clips = {0: [clip_for(va, "vid-a", 0, 0.0, 1.0), clip_for(va, "vid-a", 1, 1.0, 2.0)],
             1: [clip_for(vb, "vid-b", 0, 0.0, 1.2)]}
    root = OutputRoot(tmp_path / "out")
    seed_clips(root, clips)
    seed_videos(root, {0: [video_row(va, "vid-a", 0, 2.0)], 1: [video_row(vb, "vid-b", 1, 1.2)]})
    return root, clips, (va, vb)


def _install_doubles():
    describe_vlm = ScriptedVlm(lambda r: "A test pattern with a counter." if len(r.images) == 1
                               else f"The counter advances over {len(r.images)} frames; the pattern stays still.")

    def llm_reply(messages, attempt):
        prompt = messages[-1]["content"] if attempt == 0 else messages[0 if messages[0]["role"] == "user" else 1]["content"]
        if "HUMAN" in prompt and attempt == 0:
            return reply(QUESTIONS[0], BAD_FIRST, QUESTIONS[2])  # repaired on the re-ask
        return reply(*QUESTIONS)

    llm, backend = scripted_llm(llm_reply)
    install_expert_override("describe.vlm", describe_vlm)
    install_expert_override("qgen.llm", llm)
    install_expert_override("ffilter.judge.j1", _judge("j1"))
    install_expert_override("ffilter.judge.j2", _judge("j2"))
    return describe_vlm, backend


CONFIGS = dict(
    describe=describe.DescribeConfig(vlm=VlmSpec(model_id="fake-describer"), num_frames=4, frame_short_side_px=48),
    qgen=qgen.QgenConfig(repair_retries=2),
    ffilter=ffilter.FfilterConfig(judges=(ffilter.Judge(name="j1", vlm=VlmSpec(model_id="fake-j1")),
                                          ffilter.Judge(name="j2", vlm=VlmSpec(model_id="fake-j2"))),
                                  frame_short_side_px=32),
)


def _run(stage, root, cfg, shards=(0, 1)):
    return [run_shard(stage, root, cfg, s) for s in shards]


def _rows(root, stage, schema, cls):
    return from_table(root.read_stage(stage, schema), cls)


def test_whole_branch(mb_root, tmp_path):
    root, clips, (va, vb) = mb_root
    describe_vlm, llm_backend = _install_doubles()

    # Human description for vb (keyed by video path; vb has one clip) -> used instead of the VLM.
    human = tmp_path / "human.jsonl"
    human.write_text(json.dumps({"video_path": str(vb), "dynamic_description": "HUMAN: the counter ticks up.",
                                 "first_frame_description": "A colour test pattern.", "annotator": "ann7"}) + "\n")
    describe.store_import(root, describe.read_import_file(human))

    _run(describe.STAGE, root, CONFIGS["describe"])
    desc = {d.clip_id: d for d in _rows(root, "describe", DESC_SCHEMA, Description)}
    assert len(desc) == 3 and all(d.status == "ok" for d in desc.values())
    vb_clip = clips[1][0].clip_id
    assert desc[vb_clip].source == "human" and desc[vb_clip].annotator == "ann7"
    assert {desc[c.clip_id].source for c in clips[0]} == {"vlm"}
    assert desc[clips[0][0].clip_id].first_frame_description == "A test pattern with a counter."
    assert desc[clips[0][0].clip_id].num_frames == 4 and desc[clips[0][0].clip_id].prompt_version.startswith("describe_prompt.v1@")
    # the VLM was asked only about the two clips of va: a first-frame request and a 4-frame video request each
    assert sorted(len(r.images) for r in describe_vlm.requests) == [1, 1, 4, 4]

    _run(qgen.STAGE, root, CONFIGS["qgen"])
    qs = _rows(root, "qgen", Q_SCHEMA, Question)
    assert len(qs) == 9 and all(q.status == "ok" for q in qs)
    assert {q.category for q in qs} == {"MO", "RC", "LM"}
    assert all(q.prompt_version.startswith("qgen_prompt.v1@") for q in qs)
    assert max(q.attempts for q in qs if q.clip_id == vb_clip) == 2  # the repair re-ask happened for vb
    assert {q.attempts for q in qs if q.clip_id != vb_clip} == {1}
    assert len({q.question_id for q in qs}) == 9

    _run(ffilter.STAGE, root, CONFIGS["ffilter"])
    ff = _rows(root, "ffilter", FF_SCHEMA, FilterVerdict)
    verdicts = [v for v in ff if v.row_kind == "verdict"]
    decisions = {v.question_id: v for v in ff if v.row_kind == "decision"}
    assert len(verdicts) == 18 and all(v.status == "ok" and v.answer_letter for v in verdicts)
    stem = {q.question_id: q.question.split(":")[0] for q in qs}
    dropped = {qid for qid, d in decisions.items() if d.status == "skipped"}
    assert dropped == {qid for qid, s in stem.items() if s == "EASY"}  # exactly the all-correct ones
    assert all(decisions[q].kept is False and decisions[q].n_correct == 2 for q in dropped)
    assert {decisions[q].n_correct for q, s in stem.items() if s == "HALF"} == {1}
    assert {decisions[q].n_correct for q, s in stem.items() if s == "HARD"} == {0}

    # review, required: nothing decided yet -> every kept question is pending and stays back
    review_cfg = review.ReviewConfig(mode="required")
    _run(review.STAGE, root, review_cfg)
    rv = _rows(root, "review", REVIEW_SCHEMA, Review)
    assert len(rv) == 6 and {r.decision for r in rv} == {"pending"} and {r.status for r in rv} == {"skipped"}

    # the queue, as a hand-editable sheet with first-frame images
    items = review.pending_items(root)
    review.write_first_frames(root, items, review.first_frame_of_item)
    assert len(items) == 6 and all(Path(it["first_frame"]).is_file() for it in items)
    sheet = tmp_path / "queue.txt"
    review.write_queue(sheet, items)
    text = sheet.read_text()
    by_clip_stem = {(it["clip_id"], it["question"].split(":")[0]): it["question_id"] for it in items}
    a0 = clips[0][0].clip_id
    accept_id, reject_id, edit_id = by_clip_stem[(a0, "HALF")], by_clip_stem[(a0, "HARD")], by_clip_stem[(vb_clip, "HALF")]

    def fill(text, qid, **fields):
        block_start = text.index(f"=== question {qid}")
        block_end = text.find("=== question", block_start + 5)
        block = text[block_start:block_end if block_end > 0 else None]
        new = block
        for k, v in fields.items():
            new = re.sub(rf"(?m)^{re.escape(k)}:.*$", f"{k}: {v}", new, count=1)
        return text.replace(block, new)

    text = fill(text, accept_id, decision="accept")
    text = fill(text, reject_id, decision="reject", reason="the counter does not move sideways")
    text = fill(text, edit_id, decision="edit", reason="ambiguous wording", Q="HALF: how often does the counter change?",
                answer="D")
    sheet.write_text(text)
    by_shard, undecided, problems = review.import_decisions(root, sheet, default_reviewer="rev1")
    assert problems == [] and undecided == 3 and sum(len(v) for v in by_shard.values()) == 3
    assert shard_state(review.STAGE, root, 0) == "complete"
    review.store_decisions(root, by_shard)
    # the decisions are an external input: both shards they touch went stale
    assert shard_state(review.STAGE, root, 0) == "stale" and shard_state(review.STAGE, root, 1) == "stale"

    _run(review.STAGE, root, review_cfg)
    rv = {r.question_id: r for r in _rows(root, "review", REVIEW_SCHEMA, Review)}
    assert rv[accept_id].status == "ok" and rv[accept_id].reviewer == "rev1"
    assert rv[reject_id].status == "skipped" and "sideways" in rv[reject_id].error
    assert rv[edit_id].status == "ok" and rv[edit_id].edited and rv[edit_id].answer == "D"
    assert rv[edit_id].question == "HALF: how often does the counter change?"
    assert sum(r.status == "ok" for r in rv.values()) == 2

    _run(synthqa.STAGE, root, synthqa.SynthqaConfig())
    run_shard(finalize.STAGE, root, finalize.FinalizeConfig(seed=0, dev_ratio=0.5), 0)
    mb = _rows(root, "finalize", MB_SCHEMA, BenchmarkQuestion)
    assert {r.question_id for r in mb} == {accept_id, edit_id}
    assert {r.video_type for r in mb} == {"real"}
    edited = next(r for r in mb if r.question_id == edit_id)
    assert edited.options[ "ABCD".index(edited.answer)] == "Three times"  # the edited answer (D) moved with its text

    # official export through the CLI
    from typer.testing import CliRunner

    from flows.cli import app

    out_dir = tmp_path / "export"
    r = CliRunner().invoke(app, ["export", "motionbench", "--out", root.url, "--to", str(out_dir)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(ln) for ln in (out_dir / "video_info.meta.jsonl").read_text().splitlines()]
    assert sorted(q["uid"] for ln in lines for q in ln["qa"]) == sorted([accept_id, edit_id])
    key = json.loads((out_dir / "test_answers.json").read_text())
    for ln in lines:
        for q in ln["qa"]:
            row = next(m for m in mb if m.question_id == q["uid"])
            assert q["answer"] == ("NA" if row.split == "test" else row.answer)
            if row.split == "test":
                assert key[q["uid"]] == row.answer

    # optional mode: undecided questions go forward, decisions still apply
    _run(review.STAGE, root, review.ReviewConfig(mode="optional"))
    rv = {r.question_id: r for r in _rows(root, "review", REVIEW_SCHEMA, Review)}
    assert sum(r.status == "ok" for r in rv.values()) == 5 and rv[reject_id].status == "skipped"
    _run(review.STAGE, root, review.ReviewConfig(mode="off"))
    rv = _rows(root, "review", REVIEW_SCHEMA, Review)
    assert all(r.status == "ok" for r in rv) and len(rv) == 6


def test_review_import_rejects_bad_files(mb_root, tmp_path):
    root, clips, _ = mb_root
    _install_doubles()
    for stage, cfg in ((describe.STAGE, CONFIGS["describe"]), (qgen.STAGE, CONFIGS["qgen"]),
                       (ffilter.STAGE, CONFIGS["ffilter"])):
        _run(stage, root, cfg)
    items = review.pending_items(root)
    bad = [
        {**items[0], "decision": "maybe"},
        {**items[1], "decision": "reject", "reviewer": "r", "reason": ""},
        {**items[2], "decision": "edit", "reviewer": "r", "reason": "x", "options": {"A": "1", "B": "1", "C": "2", "D": "3"}},
        {**items[3], "decision": "accept", "reviewer": "r", "question": "Something else entirely?"},
        {**items[4], "decision": "edit", "reviewer": "r", "reason": "x", "question": "Based on the description, what moves?"},
        {**items[5], "question_id": "not-a-question", "decision": "accept", "reviewer": "r"},
        {**items[0], "decision": "accept"},  # no reviewer and no --reviewer
    ]
    f = tmp_path / "bad.jsonl"
    f.write_text("".join(json.dumps(b) + "\n" for b in bad))
    by_shard, undecided, problems = review.import_decisions(root, f)
    assert len(problems) == len(bad), problems
    joined = "\n".join(problems)
    for expected in ("accept, reject or edit", "needs a reason", "options repeat", "write 'edit'", "description",
                     "not in this output root", "no reviewer"):
        assert expected in joined

    from typer.testing import CliRunner

    from flows.cli import app

    r = CliRunner().invoke(app, ["review", "import", str(f), "--out", root.url])
    assert r.exit_code == 1 and "nothing was imported" in r.output
    assert not review.load_decisions(root, 0) and not review.load_decisions(root, 1)
    # a JSONL export / import round trip through the CLI
    q = tmp_path / "q.jsonl"
    r = CliRunner().invoke(app, ["review", "export", "--out", root.url, "--to", str(q)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(ln) for ln in q.read_text().splitlines()]
    lines[0]["decision"] = "accept"
    q.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    r = CliRunner().invoke(app, ["review", "import", str(q), "--out", root.url, "--reviewer", "rv"])
    assert r.exit_code == 0, r.output
    decided = {**review.load_decisions(root, 0), **review.load_decisions(root, 1)}
    assert list(decided) == [lines[0]["question_id"]] and decided[lines[0]["question_id"]].reviewer == "rv"


def test_describe_imports_and_staleness(mb_root, tmp_path):
    root, clips, (va, vb) = mb_root
    _install_doubles()
    _run(describe.STAGE, root, CONFIGS["describe"])
    assert shard_state(describe.STAGE, root, 0) == "complete"
    # keyed by video path of a video with two clips and no times: an error row that says what to do
    f = tmp_path / "h.jsonl"
    f.write_text(json.dumps({"video_path": str(va), "description": "someone moves"}) + "\n"
                 + json.dumps({"clip_id": clips[0][1].clip_id, "caption": "the counter ticks"}) + "\n")
    from typer.testing import CliRunner

    from flows.cli import app

    r = CliRunner().invoke(app, ["import", "descriptions", str(f), "--out", root.url])
    assert r.exit_code == 0, r.output
    assert shard_state(describe.STAGE, root, 0) == "stale"
    _run(describe.STAGE, root, CONFIGS["describe"])
    rows = {d.clip_id: d for d in _rows(root, "describe", DESC_SCHEMA, Description)}
    first, second = rows[clips[0][0].clip_id], rows[clips[0][1].clip_id]
    assert first.status == "error" and "2 clips" in first.error and "clip_id" in first.error
    assert second.status == "ok" and second.source == "human" and second.dynamic_description == "the counter ticks"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video_path": "x.mp4"}\nnot json\n')
    with pytest.raises(ValueError) as info:
        describe.read_import_file(bad)
    assert "no description text" in str(info.value) and "not JSON" in str(info.value)
    r = CliRunner().invoke(app, ["import", "descriptions", str(bad), "--out", root.url])
    assert r.exit_code == 1 and "no description text" in r.output


def test_synthetic_videos_skip_describe(tmp_path):
    video = tmp_path / "synth_0_0.mp4"
    video.write_bytes(b"")
    video.with_suffix(".json").write_text(json.dumps({"version": 1, "video": video.name, "objects": []}))
    clip = clip_for(video, "sv", 0, 0.0, 2.0)
    done, todo = describe.plan_descriptions([clip], [], CONFIGS["describe"])
    assert todo == [] and done[0].status == "skipped" and "synthqa" in done[0].error
    done, todo = describe.plan_descriptions([clip], [], CONFIGS["describe"].model_copy(update={"skip_synthetic": False}))
    assert todo == [clip] and done == []


def test_first_frame_unreadable_and_judge_failure_are_error_rows():
    q = Question(question_id="q1", clip_id="c1", video_id="v", video_path="/nope.mp4", start_s=0.0, end_s=1.0,
                 source="generated", question="HARD: what moves?", options=["a", "b", "c", "d"], answer="B",
                 category="MR")
    cfg = CONFIGS["ffilter"]
    rows = ffilter.filter_questions([q], {"j1": _judge("j1"), "j2": _judge("j2")}, cfg,
                                    lambda q: (_ for _ in ()).throw(OSError("gone")))
    assert len(rows) == 1 and rows[0].status == "error" and "first frame" in rows[0].error
    import numpy as np

    failing = ScriptedVlm(lambda r: RuntimeError("endpoint down"))
    q2 = Question(**{**q.__dict__, "question": "EASY: what color is the top bar?", "answer": "A"})
    rows = ffilter.filter_questions([q2], {"j1": _judge("j1"), "j2": failing}, cfg, lambda q: np.zeros((8, 8, 3), np.uint8))
    kinds = [(r.row_kind, r.status) for r in rows]
    assert kinds == [("verdict", "ok"), ("verdict", "error"), ("decision", "error")]
    assert "endpoint down" in rows[1].error and "on_judge_error" in rows[2].error
    keep = ffilter.FfilterConfig(judges=cfg.judges, on_judge_error="keep")
    rows = ffilter.filter_questions([q2], {"j1": _judge("j1"), "j2": failing}, keep, lambda q: np.zeros((8, 8, 3), np.uint8))
    assert rows[-1].status == "ok" and rows[-1].kept


def test_branch_through_the_prefect_flow(mb_root, prefect_harness):
    """The same branch as one Prefect flow run (thread task runner, doubles installed process-wide)."""
    from flows.pipeline import pipeline

    root, clips, _ = mb_root
    _install_doubles()
    cfg = {
        "profile": "tiny",
        "describe": {"vlm": {"model_id": "fake-describer"}, "num_frames": 4, "frame_short_side_px": 48},
        "ffilter": {"judges": [{"name": "j1", "vlm": {"model_id": "fake-j1"}},
                               {"name": "j2", "vlm": {"model_id": "fake-j2"}}]},
        "review": {"mode": "optional"},
        "runtime": {"max_workers": 2, "retries": 0},
    }
    from flows.config import load_pipeline_config

    pc = load_pipeline_config("tiny", overrides=cfg)
    names = ["describe", "qgen", "ffilter", "review", "synthqa", "finalize"]
    result = pipeline.fn(input="", out=root.url, config=pc.model_dump(mode="json"), stages=names)
    by_stage = {}
    for r in result["results"]:
        by_stage.setdefault(r["stage"], []).append(r)
    assert set(by_stage) == set(names)
    mb = _rows(root, "finalize", MB_SCHEMA, BenchmarkQuestion)
    # 9 generated, 3 answered by both judges from the first frame, 6 go forward (review optional)
    assert len(mb) == 6 and {r.question.split(":")[0] for r in mb} == {"HALF", "HARD"}


def test_review_sheet_parsing_handles_wrapped_lines_and_unknown_fields():
    item = {"question_id": "q1", "clip_path": "/v.mp4", "start_s": 0.0, "end_s": 1.0, "first_frame": None,
            "category": "AO", "question": "What happens first?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"},
            "answer": "B"}
    sheet = review.write_sheet([item])
    sheet = sheet.replace("Q: What happens first?", "Q: What happens\n   first of all?")
    sheet = sheet.replace("reason: ", "reason: the wording\nwas unclear")
    [(where, parsed)] = review.parse_sheet(sheet)
    assert parsed["question"] == "What happens first of all?" and parsed["reason"] == "the wording was unclear"
    assert parsed["options"] == {"A": "a", "B": "b", "C": "c", "D": "d"} and parsed["category"] == "AO"
    with pytest.raises(ValueError, match="line"):
        review.parse_sheet(review.write_sheet([item]).replace("answer: B", "answer: B\nverdict: fine"))
