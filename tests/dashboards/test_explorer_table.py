"""The explorer's instance list is built column-wise (Arrow joins and masks). These tests replay the rule it
implements, written here row by row, on roots where instances stop at every kind of place: in the dataset,
dropped with a reason, error rows, waiting for a stage that has not run, and a root with only detections."""
from __future__ import annotations

from pathlib import Path

import pytest

from schemas._base import STATUS_OK
from schemas.tags import SCHEMA as TAGS_SCHEMA, ClipTags
from storage.root import OutputRoot
from tests._mb_doubles import seed_stage
from tests.dashboards._roots import BROKEN, COPIES, imove_root, spread

IMOVE_ORDER = ("detect", "track", "trackfilter", "caption", "check", "tasks")


def _rows(root: OutputRoot, stage: str) -> list[dict]:
    out = []
    for shard in root.completed_shards(stage):
        out.extend(dict(r, _shard=shard) for r in root.read_shard(stage, shard).to_pylist())
    return out


def _reason(message):
    from stages.shared.reasons import normalise_reason

    return normalise_reason(message)


def reference(root: OutputRoot) -> list[dict]:
    """Where each detected instance got to, one row at a time: the first stage (in pipeline order) with no row
    for it is what it waits for; the first row that is not ok says where and why it stopped (for ``tasks``, the
    first of its samples that is not ok, else its first sample); the last row read wins where a stage has two."""
    per: dict[str, dict] = {}
    for r in _rows(root, "detect"):
        per[r["instance_id"]] = {"detect": r}
    for s in IMOVE_ORDER[1:-1]:
        for r in _rows(root, s):
            if r["instance_id"] in per:
                per[r["instance_id"]][s] = r
    samples: dict[str, list[dict]] = {}
    for r in _rows(root, "tasks"):
        samples.setdefault(r["instance_id"], []).append(r)
    tags = {r["clip_id"]: r for r in _rows(root, "tag")}
    clips = {r["clip_id"]: r for r in _rows(root, "scenes")}
    out = []
    for iid, got in per.items():
        det = got["detect"]
        status = reason = error = None
        for s in IMOVE_ORDER:
            if s == "tasks":
                mine = samples.get(iid, [])
                row = next((x for x in mine if x["status"] != STATUS_OK), mine[0] if mine else None)
            else:
                row = got.get(s)
            if row is None:
                status = f"waiting for {s}"
                break
            if row["status"] != STATUS_OK:
                status = ("error at " if row["status"] == "error" else "dropped at ") + s
                error, reason = row["error"], _reason(row["error"])
                break
        tag = tags.get(det["clip_id"]) or {}
        out.append({
            "instance_id": iid, "clip_id": det["clip_id"], "video_id": det["video_id"], "label": det["label"],
            "shard": det["_shard"], "status": status or "in dataset", "reason": reason, "error": error,
            "start_s": det["start_s"], "end_s": det["end_s"],
            "fps": det["fps"] or (clips.get(det["clip_id"]) or {}).get("fps"),
            "width": det["width"], "height": det["height"], "tag_score": det["tag_score"],
            "clip_tags": [t["tag"] for t in (tag.get("tags") or [])],
            "detection_score": det["detection_score"], "clip_score": det["clip_score"],
            "box_xyxy_px": det["box_xyxy_px"],
        })
    return sorted(out, key=lambda r: (r["video_id"], r["start_s"], r["instance_id"]))


def _drop(root: OutputRoot, stage: str, shard: int) -> None:
    """The shard was never completed: no marker (its table may stay; readers go by markers)."""
    Path(root.marker_file(stage, shard)).unlink()


@pytest.fixture(scope="module")
def spread_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explorer-table")
    src, info = imove_root(tmp / "one")
    root = OutputRoot(tmp / "spread")
    spread(src, root)
    # tags for the clips of copies 0-2 (none for copy 3); copy 0's clip tagged twice, the later shard wins
    clips = {r["clip_id"]: r for r in _rows(root, "detect")}
    by_copy = {cid.rsplit("~", 1)[1]: r for cid, r in clips.items()}

    def tagged(copy: str, names: list[str]) -> ClipTags:
        r = by_copy[copy]
        return ClipTags(clip_id=r["clip_id"], video_id=r["video_id"], video_path=r["video_path"], start_frame=0,
                        end_frame=10, start_s=r["start_s"], end_s=r["end_s"], duration_s=r["end_s"] - r["start_s"],
                        tagger="fixture", tags=[{"tag": t, "score": 0.9} for t in names], dropped_tags=[])

    seed_stage(root, "tag", TAGS_SCHEMA, {0: [tagged("0", ["car", "dog"]), tagged("1", ["bird"])],
                                          1: [tagged("2", [])], 2: [tagged("0", ["person"])]})
    return root, info


def test_the_column_wise_list_equals_the_row_by_row_rule(spread_root):
    from dashboards import review_data as rd

    root, info = spread_root
    got = rd.imove_instances(rd.Tables(root))
    assert got == reference(root)
    statuses = {r["instance_id"]: r["status"] for r in got}
    kept, dropped = info["kept"][0].instance_id, info["dropped"][0].instance_id
    assert statuses[f"{kept}~0"] == "in dataset" and statuses[f"{dropped}~0"] == "dropped at trackfilter"
    assert statuses[f"{kept}~{BROKEN}"] == "error at detect"
    assert len(got) == 2 * COPIES and len({r["reason"] for r in got if r["status"].startswith("error")}) == 1
    tags = {r["clip_id"].rsplit("~", 1)[1]: r["clip_tags"] for r in got}
    assert tags == {"0": ["person"], "1": ["bird"], "2": [], "3": []}


def test_waiting_instances_and_stages_that_never_ran(spread_root, tmp_path):
    import shutil

    import pyarrow as pa

    from dashboards import review_data as rd

    src, _ = spread_root
    root = OutputRoot(tmp_path / "waiting")
    shutil.copytree(src.path(), root.path())
    _drop(root, "caption", 1)  # copy 1 waits for its caption
    _drop(root, "check", 3)  # copy 3 waits for its check
    shutil.rmtree(root.path("tag"))  # a stage with no shard at all: no tags for any clip
    # copy 0's kept instance: its samples ok, then one dropped, then one in error (its first problem counts)
    t = root.read_shard("tasks", 0)
    kept = t.num_rows - 1
    t = t.set_column(t.schema.get_field_index("status"), "status",
                     pa.array(["ok"] * (kept - 1) + ["skipped", "error"], pa.string()))
    t = t.set_column(t.schema.get_field_index("error"), "error",
                     pa.array([None] * (kept - 1) + ["span shorter than 2 frames", "box outside the frame"], pa.string()))
    root.write_table_atomic("tasks", 0, t)
    got = rd.imove_instances(rd.Tables(root))
    assert got == reference(root)
    statuses = {r["status"] for r in got}
    assert {"waiting for caption", "waiting for check", "dropped at tasks"} <= statuses
    assert all(r["clip_tags"] == [] for r in got)


def test_a_root_with_detections_only_and_an_empty_root(spread_root, tmp_path):
    import shutil

    from dashboards import review_data as rd

    src, _ = spread_root
    root = OutputRoot(tmp_path / "detect-only")
    Path(root.path()).mkdir(parents=True)
    shutil.copytree(src.path("detect"), root.path("detect"))
    got = rd.imove_instances(rd.Tables(root))
    assert got == reference(root) and {r["status"] for r in got} == {"waiting for track", "error at detect"}
    assert all(r["fps"] for r in got)
    empty = OutputRoot(tmp_path / "empty")
    Path(empty.path()).mkdir(parents=True)
    assert rd.imove_instances(rd.Tables(empty)) == []
