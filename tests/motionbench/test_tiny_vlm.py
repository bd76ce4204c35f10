"""describe and ffilter with the real tiny VLM (tiny://qwen2_vl, random weights): rows and schema only."""
from __future__ import annotations

import pytest

from experts.vlm import VlmSpec
from schemas._base import from_table
from schemas.descriptions import SCHEMA as DESC_SCHEMA, Description
from schemas.ffilter_verdicts import SCHEMA as FF_SCHEMA, FilterVerdict
from schemas.questions import SCHEMA as Q_SCHEMA, Question
from stages.motionbench import describe, ffilter
from stages.runner import run_shard
from storage.root import OutputRoot
from tests._mb_doubles import clip_for, seed_clips, seed_stage
from tests._video_fixtures import make_testsrc, require_ffmpeg

TINY = VlmSpec(model_id="tiny://qwen2_vl", backend="transformers", device="cpu", max_new_tokens=4)


def test_describe_and_ffilter_with_tiny_qwen2_vl(tmp_path):
    require_ffmpeg()
    pytest.importorskip("transformers")
    video = make_testsrc(tmp_path / "v.mp4", width=64, height=64, duration_s=1.0)
    clip = clip_for(video, "vid", 0, 0.0, 1.0)
    root = OutputRoot(tmp_path / "out")
    seed_clips(root, {0: [clip]})

    cfg = describe.DescribeConfig(vlm=TINY, num_frames=2, frame_short_side_px=56)
    out = run_shard(describe.STAGE, root, cfg, 0)
    table = root.read_stage("describe", DESC_SCHEMA)
    assert table.schema.equals(DESC_SCHEMA, check_metadata=False)
    [row] = from_table(table, Description)
    assert out.rows == 1 and row.status == "ok", row.error
    assert row.source == "vlm" and row.num_frames == 2 and isinstance(row.dynamic_description, str)
    assert row.expert == "vlm:transformers:tiny://qwen2_vl"  # the backend named, as caption and check do

    q = Question(question_id="q1", clip_id=clip.clip_id, video_id="vid", video_path=str(video), start_s=0.0,
                 end_s=1.0, source="generated", question="What moves?", options=["a", "b", "c", "d"], answer="B",
                 category="MR")
    seed_stage(root, "qgen", Q_SCHEMA, {0: [q]})
    fcfg = ffilter.FfilterConfig(judges=(ffilter.Judge(name="tiny", vlm=TINY),), frame_short_side_px=56)
    run_shard(ffilter.STAGE, root, fcfg, 0)
    ff_table = root.read_stage("ffilter", FF_SCHEMA)
    assert ff_table.schema.equals(FF_SCHEMA, check_metadata=False)
    rows = from_table(ff_table, FilterVerdict)
    assert [(r.row_kind, r.judge) for r in rows] == [("verdict", "tiny"), ("decision", "(all)")]
    verdict, decision = rows
    assert verdict.status == "ok" and verdict.raw_reply is not None
    assert verdict.correct == (verdict.answer_letter == "B")
    assert decision.n_judges == 1 and decision.n_correct == int(bool(verdict.correct))
    assert decision.status == ("skipped" if verdict.correct else "ok")


def test_eval_run_cli_with_tiny_qwen2_vl(tmp_path):
    import json

    from typer.testing import CliRunner

    from flows.cli import app
    from stages.shared.motionbench_format import format_question

    require_ffmpeg()
    videos = tmp_path / "videos"
    videos.mkdir()
    make_testsrc(videos / "clip1.mp4", width=64, height=64, duration_s=1.0)
    meta = tmp_path / "video_info.meta.jsonl"
    meta.write_text(json.dumps({"key": "clip1", "video_path": "clip1.mp4", "video_type": "real",
                                "question_type": "Motion Recognition",
                                "qa": [{"uid": "u1", "question": format_question("What moves?", ["a", "b", "c", "d"]),
                                        "answer": "A"},
                                       {"uid": "u2", "question": format_question("What turns?", ["e", "f", "g", "h"]),
                                        "answer": "NA"}]}) + "\n")
    for extra in (["--num-frames", "2"], ["--text-only"], ["--first-frame"], ["--fps", "4"]):
        resp = tmp_path / f"resp{extra[0]}.json"
        r = CliRunner().invoke(app, ["eval", "run", "--model", "tiny://qwen2_vl", "--meta", str(meta), "--videos",
                                     str(videos), "--responses", str(resp), "--short-side", "56", "--json", *extra])
        assert r.exit_code == 0, r.output
        replies = json.loads(resp.read_text())
        assert set(replies) == {"u1", "u2"} and all(isinstance(v, str) for v in replies.values())
        result = json.loads(r.stdout[r.stdout.index("{"):])
        assert result["scored"] == 1 and result["not_scored"] == 1
