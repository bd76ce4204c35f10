"""The dataset report folds each stage shard by shard over a few columns (it runs in the flow process after
every run, and a large root's tables do not fit in memory). Its numbers must be those of the whole tables:
here a root is spread over four shards, one of them all error rows, and the report is checked against a replay
that reads every stage whole, row by row, and counts as the report's definitions say (MotionBench 3.2 for
its statistics, the iMOVE appendix for iMOVE-IT's)."""
from __future__ import annotations

import collections

import pyarrow as pa
import pytest

from dashboards import report
from dashboards.report import MB_CATEGORY_NAMES, collect
from stages.shared.reasons import group_reasons
from storage.root import OutputRoot, table_blocks
from tests.dashboards._roots import COPIES, imove_root, motionbench_root, spread


def _whole(root: OutputRoot, stage: str) -> list[dict]:
    try:
        return root.read_stage(stage).to_pylist()
    except FileNotFoundError:
        return []


def _replay(root: OutputRoot) -> dict:
    out: dict = {"drop_reasons": {}}
    for stage in root.stages_present():
        rows = _whole(root, stage)
        groups = group_reasons(r["error"] for r in rows if r["status"] != "ok")
        if groups:
            out["drop_reasons"][stage] = groups
    durations = {r["video_id"]: r["duration_s"] for r in _whole(root, "ingest") if r["status"] == "ok" and r["duration_s"]}
    samples = [r for r in _whole(root, "tasks") if r["status"] == "ok"]
    if samples:
        objects = {r["instance_id"]: r["label"] for r in samples}
        cats = collections.Counter(objects.values())
        videos = {r["video_id"] for r in samples}
        known = [durations[v] for v in videos if v in durations]
        out["imove_it"] = {
            "samples": len(samples), "objects": len(objects), "categories": len(cats),
            "objects_per_category": round(len(objects) / len(cats), 3),
            "samples_per_task": dict(sorted(collections.Counter(r["task"] for r in samples).items())),
            "videos": len(videos), "clips": len({r["clip_id"] for r in samples}),
            "mean_video_duration_s": round(sum(known) / len(known), 3) if known else None}
    questions = [r for r in _whole(root, "qgen") if r["status"] == "ok" and r["question"]]
    if questions:
        per_clip = collections.Counter(r["clip_id"] for r in questions)
        spans = {r["clip_id"]: r["end_s"] - r["start_s"] for r in questions}
        seconds = sum(spans.values())
        splits: dict = {}
        for r in questions:
            cat = MB_CATEGORY_NAMES.get(r["category"], r["category"])
            splits.setdefault(cat, collections.Counter())["(not split)"] += 1
        out["motionbench"] = {
            "source": "qgen", "questions": len(questions), "videos": len(per_clip),
            "questions_per_video_values": sorted(per_clip.values()),
            "clip_durations_values": sorted(spans.values()),
            "question characters / s": round(sum(len(r["question"]) for r in questions) / seconds, 2),
            "question + option characters / s": round(
                sum(len(r["question"]) + sum(len(o) for o in r["options"]) for r in questions) / seconds, 2),
            "question words / s": round(sum(len(r["question"].split()) for r in questions) / seconds, 2),
            "categories_per_split": {c: dict(v) for c, v in sorted(splits.items())}}
    return out


# The report folds consecutive shards as one table (report._BLOCK_ROWS): 1 folds every shard alone, the default
# folds the whole spread root as one block. Both must give the whole tables' numbers.
BLOCKS = pytest.mark.parametrize("block_rows", [1, report._BLOCK_ROWS], ids=["shard-by-shard", "blocks"])


@BLOCKS
def test_imove_it_report_over_shards_equals_the_whole_tables(tmp_path, monkeypatch, block_rows):
    monkeypatch.setattr(report, "_BLOCK_ROWS", block_rows)
    src, _ = imove_root(tmp_path / "one")
    root = OutputRoot(tmp_path / "spread")
    spread(src, root)
    data, want = collect(root.url), _replay(root)
    assert data["drop_reasons"] == want["drop_reasons"]
    broken = {"reason": "the decoder stopped at frame <n>", "count": len(_whole(src, "tasks"))}
    assert broken in [{k: g[k] for k in ("reason", "count")} for g in data["drop_reasons"]["tasks"]]
    im = {k: v for k, v in data["imove_it"].items() if k not in ("release", "top_categories")}
    assert im == want["imove_it"]
    assert im["samples"] == (COPIES - 1) * len([r for r in _whole(src, "tasks") if r["status"] == "ok"]) > 0
    assert data["numbers"]["imove_it_samples"] == im["samples"]
    assert data["numbers"]["clips"] == len([r for r in _whole(root, "scenes") if r["status"] == "ok" and r["duration_s"] is not None])


@BLOCKS
def test_motionbench_report_over_shards_equals_the_whole_tables(tmp_path, monkeypatch, block_rows):
    monkeypatch.setattr(report, "_BLOCK_ROWS", block_rows)
    (tmp_path / "one").mkdir()
    src, _ = motionbench_root(tmp_path / "one", extra=3)
    root = OutputRoot(tmp_path / "spread")
    spread(src, root)
    data, want = collect(root.url), _replay(root)
    assert data["drop_reasons"] == want["drop_reasons"]
    mb, ref = data["motionbench"], want["motionbench"]
    assert (mb["source"], mb["questions"], mb["videos"]) == (ref["source"], ref["questions"], ref["videos"])
    assert sorted(mb["questions_per_video_values"]) == ref["questions_per_video_values"]
    assert sorted(mb["clip_durations_values"]) == ref["clip_durations_values"]
    for k in ("question characters / s", "question + option characters / s", "question words / s"):
        assert mb["annotation_density"][k] == ref[k], k
    assert mb["categories_per_split"] == ref["categories_per_split"]
    assert data["numbers"]["qgen_questions"] == ref["questions"] == (COPIES - 1) * 7


def _folded(stage: str, tables) -> dict:
    st = report._Stage(stage)
    for t in tables:
        st.fold(t)

    def plain(v):
        # one entry per fold: compare the values, not how they were chunked; without nulls, which a shard that
        # lacks a kept column contributes inside a block and every reader of kept values drops (_floats,
        # ingest_durations keeps a video only with a duration)
        if isinstance(v, list):
            return sorted((x for part in v for x in (part.to_pylist() if hasattr(part, "to_pylist") else part)
                           if x is not None), key=repr)
        return v

    return {"present": st.present, "columns": sorted(st.columns), "reasons": st.reasons.groups(100),
            "counts": {k: dict(v) for k, v in st.counts.items() if v},
            "values": {k: plain(v) for k, v in st.values.items()}}


def test_blocks_fold_like_single_shards_across_schema_changes():
    """Shards of one stage written by different versions: a column one shard lacks (null there in the block),
    a column that is all null, and a column whose type changed (those shards cannot share a block with the
    others and are folded alone). Folding the blocks gives what folding each shard gives, reasons' first
    examples included."""
    tables = [
        pa.table({"status": ["ok", "error", "ok"], "error": [None, "clip 3f2a9e1b7c: decoder stopped at frame 12", None],
                  "label": ["person", None, "dog"], "video_id": ["a", "a", "b"], "duration_s": [1.5, None, 2.0]}),
        pa.table({"status": ["ok"], "error": pa.array([None], pa.string()), "label": ["person"]}),  # no ids/durations
        pa.table({"status": ["error", "error"], "error": ["clip 9d8e7f6a5b: decoder stopped at frame 40", None],
                  "label": pa.array([None, None], pa.null())}),
        pa.table({"status": ["ok"], "error": pa.array([None], pa.string()), "label": pa.array([7], pa.int64())}),
        pa.table({"status": ["ok", "ok"], "error": pa.array([None, None], pa.string()), "label": ["cat", "person"],
                  "video_id": ["c", "c"], "duration_s": [3.0, 3.0]}),
    ]
    blocks = [t for _, t in table_blocks(enumerate(tables), max_rows=report._BLOCK_ROWS,
                                         max_tables=report._BLOCK_SHARDS, promote=True)]
    assert 1 < len(blocks) < len(tables)  # some shards joined, the one with an integer label could not be
    for stage in ("track", "ingest"):  # label counts; kept ids and durations
        assert _folded(stage, blocks) == _folded(stage, tables), stage
    assert _folded("track", blocks)["counts"]["label"] == {"person": 3, "dog": 1, "cat": 1, 7: 1}
