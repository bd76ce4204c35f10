"""A resumed run makes task runs only for the (stage, shard)s that have work to do: the ones not complete, and
the ones whose input shards are re-made in the same run. Complete, up-to-date shards are reported as
"skipped-complete" without a task run (at scale, one per done shard cost CPU, server database and, at 20,000
within two minutes, task runs the server dropped: benchmarks/bench_orchestration_scale.py)."""
from __future__ import annotations

import pytest

from tests._prefect_server import eventually
from tests._video_fixtures import make_testsrc, require_ffmpeg


def _shard_task_runs(client, flow_run_id) -> list[str]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentTaskRunId, TaskRunFilter, \
        TaskRunFilterFlowRunId

    from flows.prefect_api import read_all

    subs = [r.id for r in client.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[t.id for t in client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))])))]
    return sorted(t.name for t in read_all(client.read_task_runs, task_run_filter=TaskRunFilter(
        flow_run_id=TaskRunFilterFlowRunId(any_=subs))) if " / shard " in t.name)


@pytest.mark.timeout(600)
def test_resumed_run_makes_task_runs_only_for_shards_with_work(prefect_harness, tmp_path):
    from prefect import get_client

    from dashboards.status import root_status
    from flows.config import load_pipeline_config
    from flows.pipeline import pipeline
    from storage.root import OutputRoot

    require_ffmpeg()
    videos = tmp_path / "videos"
    videos.mkdir()
    for k in range(3):
        make_testsrc(videos / f"v{k}.mp4", duration_s=0.4 + 0.2 * k)
    out = tmp_path / "out"
    # as a dict, as a deployment passes it: a test elsewhere in this process that registers a stage rebuilds the
    # config model, and an instance of the new class is not one of the class the flow's signature was made with
    cfg = load_pipeline_config("tiny", overrides={"ingest": {"shard_size": 1}, "runtime": {"retries": 0}}
                               ).model_dump(mode="json")

    def run(force: bool = False) -> tuple[dict, list[str]]:
        state = pipeline(input=str(videos), out=str(out), config=cfg, stages=["ingest", "scenes"], force=force,
                         return_state=True)
        res = state.result()
        with get_client(sync_client=True) as client:
            # the server records task runs up to a second behind, longer on a loaded machine: the wait ends as
            # soon as they are all there
            names = eventually(lambda: _shard_task_runs(client, state.state_details.flow_run_id),
                               lambda ns: len(ns) >= expected[0], timeout_s=240)
        return {(r["stage"], r["shard"]): r["action"] for r in res["results"]}, names

    expected = [6]
    actions, names = run()
    assert set(actions.values()) == {"written"} and len(names) == 6

    root = OutputRoot(str(out))
    root.delete_marker("scenes", 1)  # scenes shard 1 lost (a crash before its marker)
    root.delete_marker("ingest", 2)  # ingest shard 2 lost: it is re-made, so scenes 2 must be too
    expected[0] = 3
    import threading

    import flows.pipeline as fp

    checked_on, real_check = [], fp._complete_or_none

    def check(*a, **kw):
        checked_on.append(threading.current_thread().name)
        return real_check(*a, **kw)

    fp._complete_or_none = check
    try:
        actions, names = run()
    finally:
        fp._complete_or_none = real_check
    # ingest 0-2 and scenes 0-1 (scenes 2 waits for ingest 2): a local root's markers are read one after another
    # on the flow's thread, where threads would only contend for the GIL (the pool is for remote roots, whose
    # reads wait on the network)
    assert len(checked_on) == 5 and not any(n.startswith("precheck") for n in checked_on), checked_on
    assert names == ["ingest / shard 00002", "scenes / shard 00001", "scenes / shard 00002"]
    assert actions == {("ingest", 0): "skipped-complete", ("ingest", 1): "skipped-complete",
                       ("ingest", 2): "written", ("scenes", 0): "skipped-complete",
                       ("scenes", 1): "written", ("scenes", 2): "written"}
    assert {s["stage"]: s["complete"] for s in root_status(str(out))["stages"]} == {"ingest": 3, "scenes": 3}

    expected[0] = 0
    actions, names = run()
    assert names == [] and set(actions.values()) == {"skipped-complete"} and len(actions) == 6

    expected[0] = 6
    actions, names = run(force=True)  # force: a task run for every shard again
    assert len(names) == 6 and set(actions.values()) == {"written"}
