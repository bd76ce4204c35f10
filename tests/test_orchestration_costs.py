"""Work that used to grow faster than the data: the plan cache, the memoised status, the incremental progress
count, the VFR packet index, and the pipeline config validated once per config object."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from stages.runner import shard_state
from storage.manifest import cached_plan, read_plan, record_plan, record_stage_config
from storage.root import OutputRoot


def test_cached_plan_follows_rewrites(tmp_path):
    root = OutputRoot(str(tmp_path / "out"))
    assert cached_plan(root) is None
    record_plan(root, {"version": 1, "shards": [["a"], ["b"]]})
    first = cached_plan(root)
    assert first == read_plan(root) and cached_plan(root) is first  # parsed once while unchanged
    time.sleep(0.01)
    record_plan(root, {"version": 1, "shards": [["a"], ["b"], ["c"]]})
    os.utime(root.path("ingest", "_plan.json"), ns=(time.time_ns(), time.time_ns() + 10**9))
    assert len(cached_plan(root)["shards"]) == 3


def _synthetic_root(tmp_path, n: int):
    """ingest + scenes markers for n shards; scenes shard 1 stale (config), shard 2 pending, shard 3 stale
    (its ingest input was rewritten after it)."""
    from stages.registry import get_stage
    from stages.runner import plan_fingerprint

    root = OutputRoot(str(tmp_path / "out"))
    record_plan(root, {"version": 1, "shards": [[f"/v{k}.mp4"] for k in range(n)]})
    record_stage_config(root, "ingest", "h-ingest", {}, [])
    record_stage_config(root, "scenes", "h-scenes", {}, ["ingest"])
    for k in range(n):
        fp = f"ing-{k}"
        root.write_marker("ingest", k, {"config_hash": "h-ingest", "inputs": {"plan": plan_fingerprint(root, k)},
                                        "fingerprint": fp, "ok": 1, "error": 0, "skipped": 0, "top_errors": []})
        if k == 2:
            continue
        root.write_marker("scenes", k, {"config_hash": "old" if k == 1 else "h-scenes",
                                        "inputs": {"ingest": "rewritten" if k == 3 else fp}, "fingerprint": f"sc-{k}",
                                        "ok": 2, "error": 1, "skipped": 0, "top_errors": [["bad", 1]]})
    return root, get_stage("ingest"), get_stage("scenes")


def test_memoised_status_agrees_with_shard_state_per_shard(tmp_path):
    from dashboards.status import root_status

    root, ingest, scenes = _synthetic_root(tmp_path, 12)
    st = {s["stage"]: s for s in root_status(root.url)["stages"]}
    expected = {}
    for stage in (ingest, scenes):
        states = [shard_state(stage, root, k) for k in range(12)]  # the unmemoised path, one shard at a time
        expected[stage.name] = {s: states.count(s) for s in ("complete", "stale", "pending")}
    for name in ("ingest", "scenes"):
        got = {s: st[name][s] for s in ("complete", "stale", "pending")}
        assert got == expected[name]
    assert expected["scenes"] == {"complete": 9, "stale": 2, "pending": 1}
    assert st["scenes"]["stale_shards"] == [1, 3] and st["scenes"]["rows_ok"] == 22


def test_progress_count_is_incremental_and_notices_rewrites(tmp_path):
    from flows.cli import _Progress

    root, ingest, scenes = _synthetic_root(tmp_path, 6)
    prog = _Progress(root.url, ["ingest", "scenes"])
    assert prog._count() == (6 + 3, 12)  # scenes: 0, 4, 5 complete
    # a re-written marker (new mtime) is checked again: shard 1 of scenes completes under the current hash
    m = root.read_marker("scenes", 1)
    m["config_hash"] = "h-scenes"
    root.write_marker("scenes", 1, m)
    os.utime(root.marker_file("scenes", 1), ns=(time.time_ns(), time.time_ns() + 10**9))
    assert prog._count() == (6 + 4, 12)
    root.delete_marker("scenes", 0)
    assert prog._count() == (6 + 3, 12)


def test_vfr_frame_count_from_one_packet_index(tmp_path):
    import av

    from experts import video
    from tests._video_fixtures import make_vfr, require_ffmpeg

    require_ffmpeg()
    times = [0.0, 0.04, 0.08, 0.12, 0.16, 0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0]
    path = make_vfr(tmp_path / "vfr.mp4", times)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        pts = sorted(p.pts for p in c.demux(stream) if p.pts is not None and p.size > 0)
        index = stream.index
    video._sorted_packet_pts.cache_clear()
    for i, p in enumerate(pts):
        assert video._count_frames_before(path, index, p) == i  # frames strictly before the i-th
    assert video._count_frames_before(path, index, pts[-1] + 1) == len(pts)
    info = video._sorted_packet_pts.cache_info()
    assert info.misses == 1 and info.hits == len(pts)  # demuxed once for all the seeks


def test_pipeline_config_validated_once_per_config_object():
    from flows import pipeline as fp
    from flows.config import load_pipeline_config

    cfg = load_pipeline_config("tiny").model_dump(mode="json")
    a = fp.validated_config(cfg)
    assert fp.validated_config(cfg) is a
    other = json.loads(json.dumps(cfg))
    other["scenes"]["threshold"] = 31.0
    b = fp.validated_config(other)
    assert b is not a and b.scenes.threshold == 31.0
    bad = json.loads(json.dumps(cfg))
    bad["scenes"]["no_such_key"] = 1
    with pytest.raises(ValueError):
        fp.validated_config(bad)


_LAZY_PROBE = r"""
import json, sys
from typer.testing import CliRunner
from flows.cli import app

res = CliRunner().invoke(app, ["status", "--out", sys.argv[1], "--no-server", "--json"], catch_exceptions=False)
assert res.exit_code == 0, res.output
after_status = sorted(m for m in ("torch", "transformers", "pandas", "prefect", "experts", "scenedetect", "cv2")
                      if m in sys.modules)
from stages.registry import STAGE_MODULES, available_stages, get_stage
listed = available_stages()
described = {n: (get_stage(n).config_cls.model_json_schema()["title"], len(get_stage(n).schema),
                 list(get_stage(n).inputs)) for n in listed}
after_registry = sorted(m for m in ("torch", "transformers", "torchvision", "vllm", "open_clip", "timm")
                        if m in sys.modules)
print(json.dumps({"status": json.loads(res.output), "after_status": after_status, "listed": listed,
                  "described": described, "after_registry": after_registry}))
"""


def test_status_and_stage_registry_import_no_model_libraries(tmp_path):
    """`motionforge status` in a fresh process imports no model library (torch, transformers), nor pandas,
    Prefect or the experts; listing every stage with its config schema and table schema imports no torch
    either: models load inside the functions that run them. A fresh `status` over 10,000 shards of two stages
    spends about a third of its time importing (benchmarks/bench_status.py)."""
    import subprocess
    import sys
    from pathlib import Path

    from stages.registry import STAGE_MODULES

    root, _, _ = _synthetic_root(tmp_path, 4)
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop("PREFECT_API_URL", None)
    out = subprocess.run([sys.executable, "-c", _LAZY_PROBE, root.url], env=env, cwd=repo, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    by = {s["stage"]: s for s in got["status"]["stages"]}
    assert by["scenes"]["complete"] == 1 and by["scenes"]["stale"] == 2 and by["scenes"]["pending"] == 1
    assert got["after_status"] == []
    assert got["listed"] == list(STAGE_MODULES)
    assert all(title and n_cols > 0 for title, n_cols, _ in got["described"].values())
    assert got["described"]["scenes"][2] == ["ingest"]
    assert got["after_registry"] == []


def test_temporary_server_runs_on_uvloop_and_httptools():
    """The temporary Prefect server is ``python -m uvicorn`` with no --loop/--http (SubprocessASGIServer), so
    uvicorn's "auto" choices decide; with uvloop and httptools installed they are the C loop and parser, which
    cut the server's CPU per recorded task run (benchmarks/bench_orchestration.py)."""
    import uvicorn.config
    from uvicorn.importer import import_from_string

    cfg = uvicorn.config.Config("unused:app", loop="auto", http="auto")
    assert cfg.get_loop_factory().__module__.split(".")[0] == "uvloop"
    proto = import_from_string(uvicorn.config.HTTP_PROTOCOLS["auto"])
    assert proto.__module__ == "uvicorn.protocols.http.httptools_impl"


def test_temporary_server_batches_task_run_records(prefect_harness):
    """A Prefect server started by this process (the harness is the same SubprocessASGIServer that Prefect starts
    as the temporary server) writes task runs in batches of 100 events, flushed at least every second, not one
    INSERT per event (Prefect's default); its own report of its settings, over its API."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        settings = client.request("GET", "/admin/settings").json()
    recorder = settings["server"]["services"]["task_run_recorder"]
    assert (recorder["batch_size"], recorder["flush_interval"]) == (100, 1.0)
    assert settings["server"]["analytics_enabled"] is False


def test_temporary_server_does_not_compress_the_event_stream(prefect_harness):
    """The events websocket of a server this process started takes no per-message deflate: the client offers it
    (websockets does by default, as Prefect's events client does) and the server's handshake answer leaves it
    out, so neither side compresses the three events of every task run."""
    from prefect.settings import PREFECT_API_URL
    from websockets.sync.client import connect

    url = PREFECT_API_URL.value().replace("http://", "ws://", 1) + "/events/in"
    with connect(url, compression="deflate", open_timeout=60) as ws:
        offered = ws.request.headers.get("Sec-WebSocket-Extensions", "")
        accepted = ws.response.headers.get("Sec-WebSocket-Extensions")
    assert "permessage-deflate" in offered and accepted is None, (offered, accepted)


@pytest.mark.parametrize("given", ["environment", "profile"])
def test_server_defaults_leave_a_users_setting_alone(tmp_path, given):
    """A value the user gave, in the environment or in the active Prefect profile, is the one the temporary
    server gets: our default goes into the environment only where Prefect has no value set (an environment
    variable would outrank the profile's)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER")}
    env["PREFECT_HOME"] = str(tmp_path)
    if given == "environment":
        env["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE"] = "7"
    else:
        (tmp_path / "profiles.toml").write_text(
            'active = "mine"\n[profiles.mine]\nPREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE = "7"\n')
        env["PREFECT_PROFILES_PATH"] = str(tmp_path / "profiles.toml")
    code = ("import json, os\n"
            "from flows.prefect_api import apply_server_defaults\n"
            "apply_server_defaults()\n"
            "from prefect.settings import get_current_settings\n"
            "server = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}\n"
            "print(json.dumps({k: v for k, v in server.items() if 'TASK_RUN_RECORDER' in k}))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True).stdout
    # the environment a SubprocessASGIServer hands its server: this process's, then the settings the user set
    assert json.loads(out.splitlines()[-1]) == {"PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "7",
                                                "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1"}


def test_orchestration_benchmark_floor_is_the_pipelines_graph_with_empty_tasks(prefect_harness):
    """bench_orchestration.py subtracts Prefect's own cost per task, measured on a flow of empty tasks, from the
    pipeline's tax. That flow must have the pipeline's shape for n shards (read back from the server): one task
    run per (stage, shard) of the benchmark's stages, named as ours, each later stage's shard waiting for the same
    shard of the one before, no tags, all Completed with a message, on a pool as large as the pipeline's."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tests._benchmarks import load_benchmark

    bench = load_benchmark("bench_orchestration")
    empty = bench.empty_graph_flow()
    assert empty.task_runner._max_workers == bench.config().runtime.max_workers == 2

    state = empty(3, return_state=True)
    assert state.is_completed() and state.result() == 6
    runs, deadline = [], time.monotonic() + 120
    with get_client(sync_client=True) as client:
        # the server records task runs from their events in batches (up to a second apart): wait for all six to
        # be final there; 120 s only bounds a loaded machine, the loop ends as soon as they are
        while time.monotonic() < deadline:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            if len(runs) == 6 and all(r.state and r.state.is_final() for r in runs):
                break
            time.sleep(0.2)
    by_name = {r.name: r for r in runs}
    assert sorted(by_name) == sorted(f"{s} / shard {k:05d}" for s in bench.STAGES for k in range(3))
    for r in runs:
        assert r.state.is_completed() and r.state.message.endswith("nothing done") and not r.tags
        stage, k = r.name.split(" / shard ")
        waits = {str(i.id) for i in r.task_inputs.get("wait_for", [])}
        if stage == bench.STAGES[0]:
            assert waits == set()
        else:
            before = bench.STAGES[bench.STAGES.index(stage) - 1]
            assert waits == {str(by_name[f"{before} / shard {k}"].id)}
