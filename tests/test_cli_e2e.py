"""The CLI end to end on synthetic videos: synth, run ingest+scenes, status, run-stage on one shard."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from tests._cli import invoke as _invoke
from storage.root import OutputRoot



@pytest.fixture(scope="module")
def run_root(tmp_path_factory, prefect_harness):
    d = tmp_path_factory.mktemp("e2e")
    vids = d / "videos"
    _invoke("synth", "--out", str(vids), "--n", "3", "--seed", "5")
    (vids / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    out = d / "root"
    _invoke("run", "--input", str(vids), "--out", str(out), "--stages", "ingest,scenes", "--shard-size", "2",
            "--profile", "tiny")
    return vids, out


def test_tables_are_readable_and_bad_files_are_rows(run_root):
    vids, out = run_root
    videos = ds.dataset(str(out / "ingest"), format="parquet").to_table().to_pylist()
    assert len(videos) == 4
    bad = [v for v in videos if v["uri"].endswith("broken.mp4")]
    assert bad[0]["status"] == "error" and bad[0]["error"]
    clips = ds.dataset(str(out / "scenes"), format="parquet").to_table().to_pylist()
    assert clips and {c["status"] for c in clips} <= {"ok", "skipped"}
    assert all(c["clip_id"] and c["video_id"] for c in clips)


def test_scene_cuts_match_ground_truth(run_root):
    vids, out = run_root
    videos = {v["video_id"]: v for v in ds.dataset(str(out / "ingest"), format="parquet").to_table().to_pylist()}
    clips = ds.dataset(str(out / "scenes"), format="parquet").to_table().to_pylist()
    checked = 0
    for vid, v in videos.items():
        if v["status"] != "ok":
            continue
        truth = json.loads(Path(v["path"]).with_suffix(".json").read_text())
        starts = sorted(c["start_frame"] for c in clips if c["video_id"] == vid and c["part_index"] == 0)
        assert starts[0] == 0
        assert len(starts) - 1 == len(truth["cuts"])
        for got, want in zip(starts[1:], truth["cuts"]):
            assert abs(got - want) <= 1
        checked += 1
    assert checked == 3


def test_status_json(run_root):
    _, out = run_root
    res = _invoke("status", "--out", str(out), "--json")
    st = json.loads(res.output)
    by = {s["stage"]: s for s in st["stages"]}
    assert st["shards"] == 2
    assert by["ingest"]["complete"] == 2 and by["ingest"]["rows_ok"] == 3 and by["ingest"]["rows_error"] == 1
    assert by["scenes"]["complete"] == 2 and by["scenes"]["pending"] == 0
    assert any("broken.mp4" in e for e in by["ingest"]["first_errors"])


def test_run_stage_rewrites_one_shard_only(run_root):
    _, out = run_root
    root = OutputRoot(out)
    before = {k: root.read_marker("scenes", k)["fingerprint"] for k in (0, 1)}
    rows_before = ds.dataset(str(out / "scenes"), format="parquet").to_table().drop_columns(["created_at"])
    _invoke("run-stage", "scenes", "--out", str(out), "--shard", "0", "--force")
    after = {k: root.read_marker("scenes", k)["fingerprint"] for k in (0, 1)}
    assert after[0] != before[0] and after[1] == before[1]
    rows_after = ds.dataset(str(out / "scenes"), format="parquet").to_table().drop_columns(["created_at"])
    assert rows_after.sort_by("clip_id").equals(rows_before.sort_by("clip_id"))
    # a second plain run skips everything that is complete
    _invoke("run-stage", "scenes", "--out", str(out))
    assert {k: root.read_marker("scenes", k)["fingerprint"] for k in (0, 1)} == after


def test_status_with_the_prefect_server(run_root):
    _, out = run_root
    st = json.loads(_invoke("status", "--out", str(out), "--json", "--server").output)
    runs = st["server"]["runs"]
    assert runs and all(str(r["out"]).rstrip("/") == str(out) for r in runs)
    assert {r["state"] for r in runs} <= {"Completed", "Running"}
    assert {s["stage"] for s in st["stages"]} == {"ingest", "scenes"}  # the offline view is still there
