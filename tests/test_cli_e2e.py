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


def _no_duplicates(out, stage: str, key: str) -> list[dict]:
    rows = OutputRoot(out).read_stage(stage).to_pylist()
    seen = OutputRoot(out).dataset(stage).to_table().to_pylist()
    for table in (rows, seen):  # what stages read (completed shards) and what pyarrow.dataset shows
        keys = [r[key] for r in table]
        assert len(keys) == len(set(keys)), f"{stage}: duplicate {key}s"
    return rows


def test_second_run_with_another_shard_size_keeps_the_plan_and_duplicates_nothing(run_root, tmp_path):
    vids, _ = run_root
    out = tmp_path / "root"
    args = ["run", "--input", str(vids), "--out", str(out), "--stages", "ingest,scenes", "--profile", "tiny"]
    _invoke(*args, "--shard-size", "1")
    root = OutputRoot(out)
    clips_before = sorted(r["clip_id"] for r in _no_duplicates(out, "scenes", "clip_id"))
    fingerprints = {k: root.read_marker("scenes", k)["fingerprint"] for k in range(4)}
    # a root already damaged by an earlier re-shard: a scenes shard outside the plan, with its marker
    import shutil

    shutil.copy(root.shard_file("scenes", 0), root.shard_file("scenes", 9))
    root.write_marker("scenes", 9, root.read_marker("scenes", 0))
    _invoke(*args, "--shard-size", "3")
    assert root.read_json(root.path("ingest", "_plan.json"))["shard_size"] == 1
    assert root.read_json(root.path("_pipeline.json"))["ingest"]["shard_size"] == 1
    assert len(_no_duplicates(out, "ingest", "uri")) == 4
    assert sorted(r["clip_id"] for r in _no_duplicates(out, "scenes", "clip_id")) == clips_before
    assert root.completed_shards("scenes") == [0, 1, 2, 3]
    # the kept plan means the same config: nothing was recomputed
    assert {k: root.read_marker("scenes", k)["fingerprint"] for k in range(4)} == fingerprints


def test_run_stage_config_overrides_are_not_saved_unless_asked(run_root, tmp_path):
    _, out = run_root
    root = OutputRoot(out)
    stored = root.read_json(root.path("_pipeline.json"))
    override = tmp_path / "o.json"
    override.write_text(json.dumps({"runtime": {"max_workers": stored["runtime"]["max_workers"] + 3}}))
    _invoke("run-stage", "ingest", "--out", str(out), "--config", str(override))
    assert root.read_json(root.path("_pipeline.json")) == stored
    _invoke("run-stage", "ingest", "--out", str(out), "--config", str(override), "--save-config")
    saved = root.read_json(root.path("_pipeline.json"))
    assert saved["runtime"]["max_workers"] == stored["runtime"]["max_workers"] + 3
    root.write_json(root.path("_pipeline.json"), stored)


def test_memory_root_end_to_end(run_root):
    """An fsspec-only root (no pyarrow filesystem for ``memory://``): run, read back, status."""
    import uuid

    vids, _ = run_root
    url = f"memory://mf-e2e-{uuid.uuid4().hex[:8]}/root"
    _invoke("run", "--input", str(vids), "--out", url, "--stages", "ingest", "--shard-size", "2", "--profile", "tiny")
    rows = _no_duplicates(url, "ingest", "uri")
    assert len(rows) == 4 and sum(r["status"] == "ok" for r in rows) == 3
    st = json.loads(_invoke("status", "--out", url, "--json", "--no-server").output)
    assert {s["stage"]: s["complete"] for s in st["stages"]} == {"ingest": 2}


def test_resume_marks_the_dead_runs_flow_run_crashed(run_root, tmp_path):
    """The dead holder's lock names its flow run; the run that takes the lock over sets it to Crashed."""
    import os
    import socket
    import subprocess
    import sys

    from prefect import flow, get_client, task
    from prefect.states import Running

    @flow(name="motionforge-pipeline-victim")
    def victim():
        pass

    @flow(name="motionforge-stages-victim")
    def victim_stages():
        pass

    @task(name="stage-shard-victim")
    def victim_task():
        pass

    with get_client(sync_client=True) as client:
        fr = client.create_flow_run(victim, state=Running())
        sub_task = client.create_task_run(victim_task, flow_run_id=fr.id, dynamic_key="parent", state=Running())
        sub = client.create_flow_run(victim_stages, parent_task_run_id=sub_task.id, state=Running())
        task_run = client.create_task_run(victim_task, flow_run_id=sub.id, dynamic_key="0", state=Running())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    vids, _ = run_root
    out = tmp_path / "root"
    root = OutputRoot(out)
    root.write_json(root.path("_lock"), {"pid": dead.pid, "host": socket.gethostname(), "what": "pipeline run",
                                         "flow_run_id": str(fr.id)})
    root.write_bytes_atomic(root.path("ingest", ".tmp-0123456789ab-shard-00000.parquet"), b"PAR1 cut short")
    _invoke("run", "--input", str(vids), "--out", str(out), "--stages", "ingest", "--profile", "tiny")
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(fr.id).state
        others = [client.read_flow_run(sub.id).state, client.read_task_run(task_run.id).state]
    assert state.type.value == "CRASHED" and f"process {dead.pid}" in state.message
    assert [s.type.value for s in others] == ["CRASHED", "CRASHED"]  # the stage graph's run and its shard tasks
    assert not [n for _, _, fs in os.walk(out) for n in fs if n.startswith(".tmp-")]
    assert not root.exists(root.path("_lock"))
