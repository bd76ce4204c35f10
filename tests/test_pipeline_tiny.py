"""The iMOVE-IT branch with the tiny profile (real architectures, random weights) through the Prefect flow:
every stage writes its table, one stage re-runs for one shard, the export and the report are written."""
from __future__ import annotations

import json

import pyarrow.dataset as ds
import pytest
from tests._cli import invoke as _invoke
from schemas.imove_it import TASKS
from storage.root import OutputRoot

IMOVE = ["ingest", "scenes", "tag", "detect", "track", "trackfilter", "caption", "check", "tasks"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, prefect_harness):
    d = tmp_path_factory.mktemp("tinyrun")
    _invoke("synth", "--out", str(d / "videos"), "--n", "2", "--seed", "3")
    out = d / "root"
    _invoke("run", "--input", str(d / "videos"), "--out", str(out), "--profile", "tiny", "--shard-size", "1",
            "--stages", ",".join(IMOVE))
    return d, out


def test_every_stage_writes_its_table(tiny_run):
    _, out = tiny_run
    root = OutputRoot(out)
    for stage in IMOVE:
        assert root.completed_shards(stage) == [0, 1], stage
        table = ds.dataset(str(out / stage), format="parquet").to_table()
        statuses = table["status"].to_pylist()
        assert set(statuses) <= {"ok", "error", "skipped"}
        # The tiny profile's settings let every stage pass items on (see each stage's PROFILES["tiny"]): on two
        # valid synthetic videos each stage has ok rows and no error rows.
        assert statuses.count("ok") > 0, f"{stage} wrote no ok rows: {table.to_pylist()[:2]}"
        assert statuses.count("error") == 0, f"{stage} error rows: {[r['error'] for r in table.to_pylist()][:3]}"
    st = json.loads(_invoke("status", "--out", str(out), "--json").output)
    assert all(s["complete"] == s["shards_expected"] for s in st["stages"])
    tags = ds.dataset(str(out / "tag"), format="parquet").to_table().to_pylist()
    assert {r["expert"] for r in tags} == {"ram_plus:tiny://ram_plus"}
    # every instance that passed the checker gives one sample of each of the three tasks
    samples = [r for r in ds.dataset(str(out / "tasks"), format="parquet").to_table().to_pylist() if r["status"] == "ok"]
    per_instance = {}
    for r in samples:
        per_instance.setdefault(r["instance_id"], set()).add(r["task"])
    assert per_instance and all(t == set(TASKS) for t in per_instance.values())


def test_rerun_one_stage_one_shard_and_exports(tiny_run):
    d, out = tiny_run
    root = OutputRoot(out)
    fp = {k: root.read_marker("detect", k)["fingerprint"] for k in (0, 1)}
    _invoke("run-stage", "detect", "--out", str(out), "--shard", "1", "--force")
    assert root.read_marker("detect", 0)["fingerprint"] == fp[0]
    assert root.read_marker("detect", 1)["fingerprint"] != fp[1]
    # downstream of the rewritten shard is now stale, the other shard is not
    st = {s["stage"]: s for s in json.loads(_invoke("status", "--out", str(out), "--json").output)["stages"]}
    assert st["track"]["stale_shards"] == [1]
    _invoke("export", "imove-it", "--out", str(out), "--to", str(d / "imove_it"))
    lines = (d / "imove_it" / "imove_it_sharegpt.jsonl").read_text().splitlines()
    n_ok = sum(1 for r in ds.dataset(str(out / "tasks"), format="parquet").to_table().to_pylist() if r["status"] == "ok")
    assert len(lines) == n_ok > 0
    _invoke("report", "--out", str(out), "--to", str(d / "report.html"))
    page = (d / "report.html").read_text()
    assert "<h2>Stages</h2>" in page and "trackfilter" in page
