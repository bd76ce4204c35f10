"""The dataset report folds each stage shard by shard over a few columns (it runs in the flow process after
every run, and a large root's tables do not fit in memory). Its numbers must be those of the whole tables:
here a root is spread over four shards, one of them all error rows, and the report is checked against a replay
that reads every stage whole, row by row, and counts as the report's definitions say (MotionBench 3.2 for
its statistics, the iMOVE appendix for iMOVE-IT's)."""
from __future__ import annotations

import collections

from dashboards.report import MB_CATEGORY_NAMES, collect
from stages.shared.reasons import group_reasons
from storage.root import OutputRoot
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


def test_imove_it_report_over_shards_equals_the_whole_tables(tmp_path):
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


def test_motionbench_report_over_shards_equals_the_whole_tables(tmp_path):
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
