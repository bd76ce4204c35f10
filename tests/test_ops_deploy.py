"""Operations against a real Prefect server: pools and GPU limit, deployments, a process worker, a failing
shard re-run through the ``rerun-stage`` deployment, UI artifacts, and the server-side run status.

One server and one worker for the module; two synthetic videos, shard size 1, the stages that run on CPU in
seconds (ingest, synthqa). The injected fault is a directory where synthqa's shard-1 table must be renamed
to: the shard raises (as a full disk or a lost mount would), nothing in production code knows about it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from tests._prefect_server import drain_prefect_workers, eventually, start_server, start_worker, stop

STAGES = ["ingest", "synthqa"]
POOL = "mf-test-cpu"
GPU_POOL = "mf-test-gpu"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    base = tmp_path_factory.mktemp("prefect-server")
    proc, api = start_server(base / "home", base / "server.log")
    try:
        drain_prefect_workers()  # workers started for an earlier server (e.g. the session harness) must not serve this one
        with temporary_settings(updates={PREFECT_API_URL: api}):
            try:
                yield {"api": api, "home": base / "home", "dir": base, "proc": proc}
            finally:
                drain_prefect_workers()
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    from stages.synth.videos import SynthConfig, render_dataset

    d = tmp_path_factory.mktemp("videos")
    render_dataset(d, 2, 0, SynthConfig())
    return d


def _config(**runtime) -> dict:
    from flows.config import load_pipeline_config

    return load_pipeline_config("tiny", overrides={"ingest": {"shard_size": 1},
                                                   "runtime": {"retries": 0, **runtime}}).model_dump(mode="json")


def _tables(out: Path) -> dict[str, pa.Table]:
    from storage.root import OutputRoot

    root = OutputRoot(str(out))
    res = {}
    for st in STAGES:
        t = root.read_stage(st)
        t = t.drop_columns(["created_at"])
        res[st] = t.sort_by([(c, "ascending") for c in t.column_names if pa.types.is_string(t.schema.field(c).type)][:3])
    return res


def _cli(*args: str):
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, f"motionforge {' '.join(args)} failed:\n{res.output}\n{res.exception!r}"
    return res.output


def test_setup_deploy_fault_rerun_artifacts_status(server, videos, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    from flows.pipeline import pipeline
    from flows.server_status import server_runs
    from storage.root import OutputRoot

    # Pools and the GPU limit; running it twice changes nothing.
    _cli("setup-prefect", "--gpus", "2", "--pool", POOL, "--gpu-pool", GPU_POOL, "--gpu-limit", "mf-test-gpu")
    again = _cli("setup-prefect", "--gpus", "2", "--pool", POOL, "--gpu-pool", GPU_POOL, "--gpu-limit", "mf-test-gpu")
    assert "exists" in again and "unchanged" in again
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(POOL).type == "process"
        assert client.read_work_pool(GPU_POOL).type == "process"
        assert client.read_global_concurrency_limit_by_name("mf-test-gpu").limit == 2

    _cli("deploy", "--pool", POOL, "--profile", "tiny")
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("motionforge-pipeline/pipeline")
        assert dep.work_pool_name == POOL
        # the form: the config is the pipeline model, with the profile's values as defaults
        schema = dep.parameter_openapi_schema
        assert schema["properties"]["config"]["anyOf"][0]["$ref"].endswith("PipelineConfig")
        assert dep.parameters["config"]["profile"] == "tiny"
        assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"] and not dep.schedules[0].active
        rerun = client.read_deployment_by_name("motionforge-rerun-stage/rerun-stage")
        assert set(rerun.parameter_openapi_schema["properties"]) >= {"out", "stage", "shards", "force"}
        assert "synthqa" in rerun.parameter_openapi_schema["properties"]["stage"]["enum"]

    worker = start_worker(POOL, server["home"], server["api"], server["dir"] / "worker.log")
    try:
        out = tmp_path / "root"
        fault = Path(OutputRoot(str(out)).shard_file("synthqa", 1))
        fault.mkdir(parents=True)  # the table cannot be renamed onto a directory: shard 1 of synthqa fails
        params = {"input": str(videos), "out": str(out), "config": _config(), "stages": STAGES}
        run = run_deployment("motionforge-pipeline/pipeline", parameters=params, timeout=240, poll_interval=1)
        log = (server["dir"] / "worker.log").read_text()[-4000:]
        assert run.state.is_failed(), f"expected the injected fault to fail the run, got {run.state}\n{log}"
        assert run.name == f"pipeline ingest,synthqa -> {out.name}"
        root = OutputRoot(str(out))
        assert root.completed_shards("synthqa") == [0] and root.completed_shards("ingest") == [0, 1]
        shard0 = root.read_marker("synthqa", 0)["fingerprint"]

        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
        by_key = {a.key: a for a in arts}
        assert {"motionforge-ingest", "motionforge-synthqa", "motionforge-summary"} <= set(by_key), by_key
        assert by_key["motionforge-synthqa"].type == "table"
        table = by_key["motionforge-synthqa"].data
        table = table if isinstance(table, list) else json.loads(table)
        failed = [r for r in table if r["result"] == "FAILED"]
        assert [r["shard"] for r in failed] == [1] and "IsADirectoryError" in failed[0]["top_errors"]
        assert {"shard", "rows", "ok", "error", "items_per_s", "top_errors"} <= set(table[0])
        assert "dataset report" in by_key["motionforge-summary"].data
        assert "synthqa / shard 00001" in by_key["motionforge-summary"].data

        def failed_shards(status: dict) -> list:
            return [t for r in status["runs"] for t in r["task_runs"] if t["state"] == "Failed"]

        status = eventually(lambda: server_runs(str(out)), failed_shards)  # task runs: up to ~1 s behind
        mine = [r for r in status["runs"] if r["flow"] == "motionforge-stages"]
        assert mine and mine[0]["task_runs"] == [
            {"stage": "synthqa", "shard": 1, "state": "Failed", "message": mine[0]["task_runs"][0]["message"]}]
        assert [r["state"] for r in status["runs"] if r["flow"] == "motionforge-pipeline"] == ["Failed"]
        shown = json.loads(_cli("runs", "--out", str(out), "--json"))
        assert {(t["stage"], t["shard"], t["state"]) for r in shown["runs"] for t in r["task_runs"]} == {("synthqa", 1, "Failed")}
        shown = _cli("runs", "--out", str(out))
        assert "rerun-stage" not in shown and shown.count("Failed") >= 3, shown  # pipeline, its stages subflow, the shard

        # Repair, then re-run just that stage and shard from the rerun-stage deployment.
        fault.rmdir()
        rerun_run = run_deployment("motionforge-rerun-stage/rerun-stage", timeout=240, poll_interval=1,
                                   parameters={"out": str(out), "stage": "synthqa", "shards": [1], "force": False})
        assert rerun_run.state.is_completed(), f"{rerun_run.state}\n{(server['dir'] / 'worker.log').read_text()[-4000:]}"
        assert rerun_run.name == f"rerun synthqa / shard 00001 -> {out.name}"
        assert root.completed_shards("synthqa") == [0, 1]
        assert root.read_marker("synthqa", 0)["fingerprint"] == shard0, "shard 0 must not be recomputed"
    finally:
        stop(worker)

    clean = tmp_path / "clean"
    pipeline(input=str(videos), out=str(clean), config=_config(), stages=STAGES)
    got, want = _tables(out), _tables(clean)
    for st in STAGES:
        assert got[st].num_rows > 0
        assert got[st].equals(want[st]), f"{st}: the repaired root differs from a clean run"

    # The GPU layout: pipeline and rerun-stage-gpu on the GPU pool, rerun-stage on the CPU pool.
    _cli("deploy", "--pool", POOL, "--gpu-pool", GPU_POOL, "--gpu-limit", "mf-test-gpu", "--profile", "tiny")
    with get_client(sync_client=True) as client:
        assert client.read_deployment_by_name("motionforge-pipeline/pipeline").work_pool_name == GPU_POOL
        assert client.read_deployment_by_name("motionforge-rerun-stage/rerun-stage-gpu").work_pool_name == GPU_POOL
        assert client.read_deployment_by_name("motionforge-rerun-stage/rerun-stage").work_pool_name == POOL
        # training and evaluation run on the GPU pool too, and hold the same GPU limit's slots
        for name in ("motionforge-train/train", "motionforge-eval/eval"):
            td = client.read_deployment_by_name(name)
            assert td.work_pool_name == GPU_POOL and td.parameters["gpu_limit"] == "mf-test-gpu"
        train_schema = client.read_deployment_by_name("motionforge-train/train").parameter_openapi_schema
        assert "config" in train_schema["properties"]  # the training config renders as a form
        dep = client.read_deployment_by_name("motionforge-pipeline/pipeline")
        assert dep.parameters["config"]["runtime"]["gpu_concurrency_limit"] == "mf-test-gpu"


def test_runs_without_server_says_what_to_do(monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        res = CliRunner().invoke(app, ["runs"])
    assert res.exit_code == 1 and "PREFECT_API_URL is not set" in res.output


def test_deploy_to_a_missing_work_pool_says_how_to_create_it(server):
    from typer.testing import CliRunner

    from flows.cli import app

    res = CliRunner().invoke(app, ["deploy", "--pool", "mf-no-such-pool", "--profile", "tiny"])
    text = " ".join(res.output.split())  # rich wraps long lines
    assert res.exit_code == 1, res.output
    assert "'mf-no-such-pool'" in text and "do not exist" in text and "motionforge setup-prefect" in text
    assert res.exception is None or isinstance(res.exception, SystemExit)  # a message, not a traceback
    from prefect import get_client

    with get_client(sync_client=True) as client:  # and nothing was registered on the missing pool
        pools = {d.work_pool_name for d in client.read_deployments()}
    assert "mf-no-such-pool" not in pools
