"""`motionforge report`: drop reasons grouped by cause, MotionBench's own statistics (section 3.2), iMOVE-IT's
counts, and the page served over HTTP by the review server."""
from __future__ import annotations

import uuid

from fastapi.testclient import TestClient

from stages.shared.reasons import group_reasons, normalise_reason
from dashboards.report import collect, render_html
from dashboards.server import create_app
from schemas.motionbench import SCHEMA as MB_SCHEMA, BenchmarkQuestion
from schemas.questions import SCHEMA as Q_SCHEMA, Question
from storage.root import OutputRoot
from tests._mb_doubles import make_plan, seed_stage
from tests.dashboards._roots import imove_root


def test_reasons_are_grouped_by_cause():
    msgs = [f"qgen for clip {uuid.uuid4()}: reply is not valid JSON (Expecting value: line 1 column {k} (char {k}))"
            "; re-run qgen when the LLM endpoint works" for k in range(5)]
    msgs += [f"qgen for clip {uuid.uuid4()}, question 2: options repeat", "could not read frames 1.20-3.40s of /v/a.mp4: EOF",
             "could not read frames 0.00-2.00s of /v/b.mp4: EOF", None]
    groups = group_reasons(msgs)
    assert groups[0]["count"] == 5 and groups[0]["reason"].startswith("reply is not valid JSON (Expecting value")
    assert "qgen for clip" in groups[0]["example"]  # one message as written, to find the item
    by = {g["reason"]: g["count"] for g in groups}
    assert by["could not read frames <n>-<n>s of <path>: EOF"] == 2
    assert by["options repeat"] == 1 and by["(no reason)"] == 1
    caps = group_reasons([f"over the per-tag cap: detection score 1.00 ranks 3 for '{t}' > max_boxes_per_tag=2"
                          for t in ("run", "jump", "blue sky")])
    assert caps == [{"reason": "over the per-tag cap: detection score <n> ranks <n> for <text> > max_boxes_per_tag=<n>",
                     "count": 3, "example": "over the per-tag cap: detection score 1.00 ranks 3 for 'run' > max_boxes_per_tag=2"}]
    # ids inside words and version-like names are not numbers
    assert normalise_reason("model rev1 failed") == "model rev1 failed"


def _bq(key: str, video: str, start: float, end: float, question: str, options: list[str], category: str, split: str):
    return BenchmarkQuestion(question_id=str(uuid.uuid4()), key=key, video_id=video, video_path=f"/v/{video}.mp4",
                             start_s=start, end_s=end, video_type="real", category=category, question_type="mcq",
                             question=question, options=options, answer="A", split=split, source="qgen")


def test_motionbench_statistics_replay_section_3_2(tmp_path):
    root = OutputRoot(tmp_path / "root")
    make_plan(root, {0: ["/v/a.mp4", "/v/b.mp4"]})
    rows = [
        _bq("a1", "a", 0.0, 2.0, "How many hops?", ["1", "2", "3", "4"], "RC", "dev"),        # 14 chars, 3 words
        _bq("a1", "a", 0.0, 2.0, "Which way?", ["up", "down", "left", "right"], "LM", "test"),  # 10 chars, 2 words
        _bq("b1", "b", 1.0, 4.0, "What moves first?", ["a", "b", "c", "d"], "AO", "test"),     # 17 chars, 3 words
    ]
    seed_stage(root, "finalize", MB_SCHEMA, {0: rows})
    # an error row of qgen, five times with different clip ids: one cause
    qs = [Question(question_id=str(uuid.uuid4()), clip_id=str(uuid.uuid4()), video_id="a", video_path="/v/a.mp4",
                   start_s=0.0, end_s=2.0, source="vlm", status="error",
                   error=f"qgen for clip {uuid.uuid4()}: reply is not valid JSON (Expecting value: line 1 column 1 (char 0))")
          for _ in range(5)]
    seed_stage(root, "qgen", Q_SCHEMA, {0: qs})
    data = collect(root.url)
    mb = data["motionbench"]
    # replayed by hand from the rows above: 2 distinct clips (2 s and 3 s of video), 3 questions
    assert (mb["source"], mb["questions"], mb["videos"]) == ("finalize", 3, 2)
    assert mb["questions_per_video"] == 1.5 and sorted(mb["questions_per_video_values"]) == [1, 2]
    assert sorted(mb["clip_durations_values"]) == [2.0, 3.0] and mb["video_seconds"] == 5.0
    assert mb["annotation_density"]["question characters / s"] == round((14 + 10 + 17) / 5, 2)
    assert mb["annotation_density"]["question words / s"] == round((3 + 2 + 3) / 5, 2)
    opt_chars = 4 + (2 + 4 + 4 + 5) + 4
    assert mb["annotation_density"]["question + option characters / s"] == round((41 + opt_chars) / 5, 2)
    assert mb["categories_per_split"] == {"Action Order": {"test": 1}, "Location-related Motion": {"test": 1},
                                          "Repetition Count": {"dev": 1}}
    assert data["drop_reasons"]["qgen"] == [{"reason": "reply is not valid JSON (Expecting value: line <n> column <n> (char <n>))",
                                             "count": 5, "example": qs[0].error}]
    page = render_html(data)
    assert "MotionBench statistics" in page and "68.4" in page and "Categories per split" in page
    assert "reply is not valid JSON" in page and "MotionBench questions per video" in data["plots"]


def test_imove_it_counts_and_report_over_http(tmp_path):
    root, info = imove_root(tmp_path)
    data = collect(root.url)
    im = data["imove_it"]
    assert (im["objects"], im["categories"], im["samples"]) == (1, 1, 3)
    assert im["samples_per_task"] == {"dynamic_captioning": 1, "spatial_grounding": 1, "temporal_grounding": 1}
    assert im["release"]["objects"] == 114705
    page = TestClient(create_app(root.url)).get("/report")
    assert page.status_code == 200 and "iMOVE-IT statistics" in page.text and "mean CLIP score &lt;n&gt;" in page.text


def test_report_reads_each_stage_once(tmp_path, monkeypatch):
    """Building the report reads every shard file of a stage once, however many sections look at that stage
    (the run's summary builds it after every run, over all shards: repeated reads of `tasks`, `scenes`, `track` were
    most of its cost), and only the columns it shows: never a whole stage, nor a track's points (the report
    runs in the flow process after every run, and a million-video root's track table is tens of GB)."""
    import collections

    root, _ = imove_root(tmp_path)
    reads: collections.Counter = collections.Counter()
    columns: dict[str, set] = collections.defaultdict(set)
    real = OutputRoot.read_shard

    def counting(self, stage, shard, schema=None, columns_=None, **kw):
        cols = kw.get("columns", columns_)
        reads[(stage, shard)] += 1
        assert cols is not None, f"{stage} shard {shard} read whole"
        table = real(self, stage, shard, schema, columns=cols, use_threads=kw.get("use_threads", True))
        columns[stage].update(table.column_names)
        return table

    def whole(self, stage, schema=None):
        raise AssertionError(f"the report read all of {stage} at once")

    monkeypatch.setattr(OutputRoot, "read_shard", counting)
    monkeypatch.setattr(OutputRoot, "read_stage", whole)
    data = collect(root.url)
    assert data["imove_it"]["samples"] == 3 and data["numbers"]["imove_it_samples"] == 3
    assert reads and max(reads.values()) == 1, reads
    assert {"scenes", "track", "tasks"} <= {stage for stage, _ in reads}  # the ones it used to read 2-3 times
    assert columns["track"] == {"status", "error", "label"}, columns["track"]
    assert "conversations" not in columns["tasks"] and "points" not in columns["track"]


def test_prefect_summary_links_a_report_the_browser_can_open(tmp_path, monkeypatch):
    from flows.pipeline import _report_link

    root, _ = imove_root(tmp_path)
    monkeypatch.delenv("MOTIONFORGE_REPORT_URL", raising=False)
    md = _report_link(root.url)
    assert "file://" not in md and "dataset report" in md and "motionforge review serve" in md
    assert (tmp_path / "root" / "_report" / "index.html").is_file()
    assert "**iMOVE-IT**: 1 objects in 1 categories, 3 samples" in md
    assert "| trackfilter | mean CLIP score <n> < <n> over <n> sampled frames (x1) |" in md
    monkeypatch.setenv("MOTIONFORGE_REPORT_URL", "http://review.example:8765/")
    md = _report_link(root.url)
    assert md.startswith("[dataset report](http://review.example:8765/report)")


def test_markers_status_and_artifacts_count_one_cause_once(tmp_path):
    """Five clips failing the same way are one reason x5 in the shard marker, `status` and the stage artifact,
    shown with the first message (so the item can still be found)."""
    from dashboards.status import root_status
    from flows.pipeline import stage_table

    root = OutputRoot(tmp_path / "root")
    make_plan(root, {0: ["/v/a.mp4"], 1: ["/v/b.mp4"]})
    def bad(k):
        return Question(question_id=str(uuid.uuid4()), clip_id=str(uuid.uuid4()), video_id="a", video_path="/v/a.mp4",
                        start_s=0.0, end_s=2.0, source="vlm", status="error",
                        error=f"qgen for clip {uuid.uuid4()}: reply is not valid JSON (Expecting value: line 1 column {k})")
    rows = {0: [bad(k) for k in range(5)], 1: [bad(k) for k in range(3)]}
    seed_stage(root, "qgen", Q_SCHEMA, rows)
    top = root.read_marker("qgen", 0)["top_errors"]
    assert top == [[rows[0][0].error, 5]]
    st = {s["stage"]: s for s in root_status(root.url, stages={"qgen": _stage("qgen")})["stages"]}
    assert st["qgen"]["first_errors"] == [f"{rows[0][0].error} (x8)"]
    results = [{"stage": "qgen", "shard": k, "action": "written", "rows": len(v), "ok": 0, "error": len(v), "skipped": 0,
                "seconds": 1.0, "top_errors": root.read_marker("qgen", k)["top_errors"]} for k, v in rows.items()]
    _, desc = stage_table("qgen", results, [])
    assert f"{rows[0][0].error} (x8)" in desc


def _stage(name):
    from stages.registry import get_stage

    return get_stage(name)
