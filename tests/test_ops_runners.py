"""Task runners and GPU slots: a Prefect global concurrency limit of one slot serialises two GPU stages that
are ready together; RayTaskRunner (local Ray, CPU only) produces the same tables as the thread pool."""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import os
import sys
import time
import types
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from schemas._base import Record, record_schema
from stages.base import Resources, Stage, StageConfig
from tests._prefect_server import eventually

GPU_SCHEMA = record_schema([pa.field("item", pa.string(), nullable=False),
                            pa.field("start_s", pa.float64(), nullable=False),
                            pa.field("end_s", pa.float64(), nullable=False)], name="gpu_probe")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GpuProbe(Record):
    item: str
    start_s: float
    end_s: float


class GpuProbeConfig(StageConfig):
    busy_s: float = 2.5  # long enough that, with two slots, both start before either ends even on a loaded machine


def _busy(ctx):
    start = time.time()
    time.sleep(ctx.config.busy_s)
    return [GpuProbe(item=f"shard-{ctx.shard}", start_s=start, end_s=time.time())]


@contextlib.contextmanager
def _registered(stages: list[Stage]):
    """Test-only stages in the registry (and so in the pipeline config) for the duration of the block."""
    import flows.pipeline  # noqa: F401 -- its parameter annotations must be built from the real stages
    from flows.config import pipeline_model
    from stages import registry

    with pytest.MonkeyPatch.context() as mp:
        for st in stages:
            mod = types.ModuleType(f"tests._stage_{st.name}")
            mod.STAGE = st
            mp.setitem(sys.modules, mod.__name__, mod)
            mp.setitem(registry.STAGE_MODULES, st.name, mod.__name__)
        registry.get_stage.cache_clear()
        pipeline_model.cache_clear()
        try:
            yield [st.name for st in stages]
        finally:
            registry.get_stage.cache_clear()
            pipeline_model.cache_clear()
    registry.get_stage.cache_clear()
    pipeline_model.cache_clear()


@pytest.fixture
def gpu_stages():
    """Two test-only stages that declare one GPU each and have no inputs, so both are ready at once."""
    with _registered([Stage(name=name, schema=GPU_SCHEMA, inputs=(), config_cls=GpuProbeConfig, process=_busy,
                            resources=Resources(cpus=1, gpus=1)) for name in ("gpu_probe_a", "gpu_probe_b")]) as names:
        yield tuple(names)


def _create_limit(slots: int) -> str:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = f"mf-test-gpu-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
    return name


def _intervals(out: Path, names) -> list[tuple[float, float]]:
    from storage.root import OutputRoot

    root = OutputRoot(str(out))
    rows = [root.read_stage(n).to_pylist()[0] for n in names]
    return [(r["start_s"], r["end_s"]) for r in rows]


def test_one_gpu_slot_runs_one_gpu_stage_at_a_time(prefect_harness, gpu_stages, tmp_path):
    from flows.config import pipeline_model
    from flows.pipeline import GpuLimitMissingError, _run_graph, gpu_slot
    from storage.root import OutputRoot
    from tests._slow_stage import plan

    def run(limit: str, out: Path):
        plan(OutputRoot(str(out)), 1, 1)
        pc = pipeline_model().model_validate({"runtime": {"gpu_concurrency_limit": limit, "retries": 0, "max_workers": 4}})
        results, failures = _run_graph(str(out), list(gpu_stages), [0], pc.model_dump(mode="json"), False, pc.runtime)
        assert not failures and len(results) == 2
        return sorted(_intervals(out, gpu_stages))

    (a0, a1), (b0, b1) = run(_create_limit(1), tmp_path / "one")
    assert b0 >= a1, f"with one GPU slot the second GPU stage started at {b0:.2f} before the first ended at {a1:.2f}"
    # The control: with two slots the same two stages do overlap, so the check above can fail.
    (a0, a1), (b0, b1) = run(_create_limit(2), tmp_path / "two")
    assert b0 < a1, "with two GPU slots the two GPU stages should have run together"

    with pytest.raises(GpuLimitMissingError, match="setup-prefect --gpus N --gpu-limit no-such-limit"):
        with gpu_slot(gpu_stages[0], "no-such-limit"):
            pass


def test_ray_remote_options_follow_stage_resources():
    from flows.pipeline import ray_remote_options

    assert ray_remote_options(Resources(cpus=2, gpus=1), cluster_gpus=8) == {"num_cpus": 2, "num_gpus": 1, "max_calls": 0}
    assert ray_remote_options(Resources(cpus=1, gpus=0.25), cluster_gpus=8) == {"num_cpus": 1, "num_gpus": 0.25, "max_calls": 0}
    assert ray_remote_options(Resources(cpus=1, gpus=1), cluster_gpus=0) == {"num_cpus": 1, "num_gpus": 0.0}
    assert ray_remote_options(Resources(cpus=0.5), cluster_gpus=8) == {"num_cpus": 0.5, "num_gpus": 0.0}


def _tables(out: Path, stages) -> dict[str, pa.Table]:
    from storage.root import OutputRoot

    root = OutputRoot(str(out))
    res = {}
    for st in stages:
        t = root.read_stage(st).drop_columns(["created_at"])
        keys = [c for c in t.column_names if pa.types.is_string(t.schema.field(c).type)][:3]
        res[st] = t.sort_by([(c, "ascending") for c in keys])
    return res


def _processes_with_env(tag: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if tag.encode() in (d / "environ").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def ray_cleanup(monkeypatch):
    """Ray processes this test starts inherit a unique variable; any still alive afterwards (Ray can leave a
    worker that was still starting when it shut down) are stopped by PID, never by name."""
    import signal

    tag = f"motionforge-ray-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("MOTIONFORGE_TEST_RAY_TAG", tag)
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
    deadline = time.monotonic() + 10
    while _processes_with_env(tag) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _processes_with_env(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ray_task_runner_matches_thread_pool(prefect_harness, ray_cleanup, tmp_path):
    from flows.config import load_pipeline_config
    from flows.pipeline import pipeline
    from stages.synth.videos import SynthConfig, render_dataset

    videos = tmp_path / "videos"
    render_dataset(videos, 2, 0, SynthConfig())
    stages = ["ingest", "synthqa"]
    outs = {}
    for runner in ("thread", "ray"):
        pc = load_pipeline_config("tiny", overrides={"ingest": {"shard_size": 1},
                                                     "runtime": {"task_runner": runner, "retries": 0}})
        res = pipeline(input=str(videos), out=str(tmp_path / runner), config=pc.model_dump(mode="json"), stages=stages)
        pids = {r["pid"] for r in res["results"]}
        if runner == "ray":
            assert os.getpid() not in pids, "Ray runs tasks in its worker processes, not in the flow's process"
        else:
            assert pids == {os.getpid()}
        outs[runner] = _tables(tmp_path / runner, stages)
    import ray

    assert not ray.is_initialized(), "the local Ray instance the runner started must be shut down with the flow"
    for st in stages:
        assert outs["ray"][st].num_rows > 0
        assert outs["ray"][st].equals(outs["thread"][st]), f"{st}: Ray and thread-pool outputs differ"


def test_stage_table_artifact_rows_and_reasons():
    from flows.pipeline import artifact_key, stage_table

    results = [
        {"stage": "track", "shard": 2, "action": "written", "rows": 10, "ok": 8, "error": 2, "skipped": 0,
         "seconds": 4.0, "top_errors": [["no box in first frame", 2]]},
        {"stage": "track", "shard": 0, "action": "skipped-complete", "rows": 6, "ok": 5, "error": 1, "skipped": 0,
         "seconds": 0.001, "top_errors": [["no box in first frame", 1]]},
        {"stage": "detect", "shard": 0, "action": "written", "rows": 3, "ok": 3, "error": 0, "skipped": 0,
         "seconds": 1.0, "top_errors": []},
    ]
    failures = [{"stage": "track", "shard": 1, "error": "OutOfMemoryError: CUDA out of memory"}]
    rows, desc = stage_table("track", results, failures)
    assert [(r["shard"], r["result"]) for r in rows] == [(0, "skipped-complete"), (2, "written"), (1, "FAILED")]
    assert rows[1]["items_per_s"] == 2.5 and rows[0]["items_per_s"] is None  # a skipped shard computed nothing
    assert rows[2]["top_errors"].startswith("OutOfMemoryError")
    assert "3 shards (1 failed), rows ok 13, error 3" in desc and "2.5 items/s" in desc
    assert "no box in first frame (x3)" in desc
    assert artifact_key("track") == "motionforge-track" and artifact_key("Track_Filter") == "motionforge-track-filter"


def test_stage_table_artifact_keeps_failed_and_written_shards_within_its_size(monkeypatch):
    """A stage of thousands of shards lists at most TABLE_ROWS of them: every failed one, then the ones written
    in this run by shard; the description's totals count all of them."""
    import flows.pipeline as fp

    monkeypatch.setattr(fp, "TABLE_ROWS", 5)
    results = [{"stage": "track", "shard": k, "action": "written" if k % 3 == 0 else "skipped-complete",
                "rows": 2, "ok": 2, "error": 0, "skipped": 0, "seconds": 1.0, "top_errors": []} for k in range(12)]
    failures = [{"stage": "track", "shard": 12 + k, "error": "boom"} for k in range(2)]
    rows, desc = fp.stage_table("track", results, failures)
    assert [(r["shard"], r["result"]) for r in rows] == [(0, "written"), (3, "written"), (6, "written"),
                                                         (12, "FAILED"), (13, "FAILED")]
    assert "14 shards (2 failed), rows ok 24, error 0" in desc and "lists 5 of the 14 shards" in desc
    rows, desc = fp.stage_table("track", results[:3], [])
    assert len(rows) == 3 and "lists" not in desc


# -- streaming: shard k of a stage waits only for shard k of its inputs -------------------------------------
STREAM_SCHEMA = record_schema([pa.field("item", pa.string(), nullable=False),
                               pa.field("saw_downstream_start", pa.bool_(), nullable=False)], name="stream_probe")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StreamProbe(Record):
    item: str
    saw_downstream_start: bool


class StreamProbeConfig(StageConfig):
    # Only reached when streaming is broken (the downstream shard cannot start): then the test fails, slowly.
    wait_s: float = 120.0


DOWNSTREAM_STARTED = threading.Event()


def _upstream(ctx):
    # The LAST upstream shard holds until downstream shard 0 has started. With streaming it starts as soon
    # as upstream shard 0 is complete; a flow that made it wait for every upstream shard never lets it start.
    seen = DOWNSTREAM_STARTED.wait(ctx.config.wait_s) if ctx.shard == 1 else False
    return [StreamProbe(item=f"up-{ctx.shard}", saw_downstream_start=seen)]


def _downstream(ctx):
    if ctx.shard == 0:
        DOWNSTREAM_STARTED.set()
    return [StreamProbe(item=f"down-{ctx.shard}", saw_downstream_start=False)]


def test_later_stage_starts_before_earlier_stage_ends(prefect_harness, tmp_path):
    from flows.config import pipeline_model
    from flows.pipeline import _run_graph
    from storage.root import OutputRoot
    from tests._slow_stage import plan

    DOWNSTREAM_STARTED.clear()
    up = Stage(name="stream_up", schema=STREAM_SCHEMA, inputs=(), config_cls=StreamProbeConfig, process=_upstream)
    down = Stage(name="stream_down", schema=STREAM_SCHEMA, inputs=("stream_up",), config_cls=StreamProbeConfig,
                 process=_downstream)
    with _registered([up, down]) as names:
        out = tmp_path / "stream"
        plan(OutputRoot(str(out)), 2, 1)
        pc = pipeline_model().model_validate({"runtime": {"retries": 0, "max_workers": 4}})
        results, failures = _run_graph(str(out), names, [0, 1], pc.model_dump(mode="json"), False, pc.runtime)
        assert not failures and len(results) == 4
        rows = {r["item"]: r for r in OutputRoot(str(out)).read_stage("stream_up").to_pylist()}
    assert rows["up-1"]["saw_downstream_start"], \
        "downstream shard 0 did not start while upstream shard 1 was running: shards are not streamed"


# -- per-task tax: the config travels quoted, the outcome is the task run's state message -------------------
def test_submit_passes_the_config_quoted_so_prefect_does_not_walk_it(monkeypatch):
    """Prefect walks every task argument for futures at submission and again at task start; the pipeline config
    is a large nested dict, so it goes in `quote` (not walked, unwrapped for the task), the shard dependencies
    being the explicit `wait_for` futures."""
    from prefect.utilities.annotations import quote

    import flows.pipeline as fp
    from flows.config import pipeline_model

    calls = []

    class _Opts:
        def submit(self, *args, wait_for):
            calls.append((args, list(wait_for)))
            return object()

    monkeypatch.setattr(fp.stage_shard, "with_options", lambda **kw: _Opts())
    pc = pipeline_model().model_validate({"runtime": {"retries": 0}})
    cfg = pc.model_dump(mode="json")
    futures, done = fp._submit(["ingest", "scenes"], [0, 1], "/tmp/x", cfg, False, pc.runtime)
    assert done == []  # no root there: nothing is complete
    assert len(calls) == 4 and set(futures) == {("ingest", 0), ("ingest", 1), ("scenes", 0), ("scenes", 1)}
    for (stage, shard, out, config, force), waits in calls:
        assert isinstance(config, quote) and config.unquote() is cfg
        assert waits == ([] if stage == "ingest" else [futures[("ingest", shard)]])


def test_task_run_state_message_is_the_shard_outcome(prefect_harness, tmp_path):
    """Each (stage, shard) task run ends Completed with the outcome line as its state message (what the UI shows
    on the task run, and Prefect's one "Finished in state" log line per task), and the flow still gets the
    outcome dicts. No task run is recorded as an input of another: the shards of one stage are independent,
    though each outcome holds the same stage-name object the next shard gets as its ``stage`` argument (one
    worker, so shard 1 starts after shard 0 has finished and its result is linked)."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from flows.config import pipeline_model
    from flows.pipeline import _run_graph
    from storage.root import OutputRoot
    from tests._slow_stage import plan

    name = f"msg_probe_{uuid.uuid4().hex[:6]}"
    st = Stage(name=name, schema=STREAM_SCHEMA, inputs=(), config_cls=StreamProbeConfig,
               process=lambda ctx: [StreamProbe(item=f"x-{ctx.shard}", saw_downstream_start=False)])
    with _registered([st]) as names:
        out = tmp_path / "msg"
        plan(OutputRoot(str(out)), 2, 1)
        pc = pipeline_model().model_validate({"runtime": {"retries": 0, "max_workers": 1}})
        results, failures = _run_graph(str(out), names, [0, 1], pc.model_dump(mode="json"), False, pc.runtime)
    assert not failures and sorted(r["shard"] for r in results) == [0, 1]
    assert all(r["stage"] == name and r["action"] == "written" and r["rows"] == 1 for r in results)
    with get_client(sync_client=True) as client:
        runs = eventually(lambda: client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(any_=[f"{name} / shard 00000", f"{name} / shard 00001"]))),
            lambda rs: len(rs) == 2 and all(r.state.is_final() for r in rs))
    assert sorted(r.name for r in runs) == [f"{name} / shard 00000", f"{name} / shard 00001"]
    for r in runs:
        assert r.state.is_completed()
        assert r.state.message.startswith(f"{r.name}: written, 1 rows (1 ok, 0 error, 0 skipped) in ")
        assert all(inputs == [] for inputs in r.task_inputs.values()), (r.name, r.task_inputs)


# -- several shards per task run (runtime.shards_per_task) --------------------------------------------------
def test_submit_groups_shards_and_waits_for_each_input_task_run_once(monkeypatch):
    """With ``shards_per_task`` a stage's shards go to task runs of that many, in shard order; a group waits for
    the task runs of its shards' inputs, each once, and every shard maps to its group's future."""
    import flows.pipeline as fp
    from flows.config import pipeline_model

    calls = []

    class _Opts:
        def submit(self, *args, wait_for):
            fut = object()
            calls.append((args, list(wait_for), fut))
            return fut

    monkeypatch.setattr(fp.stage_shards, "with_options", lambda **kw: _Opts())
    class _Single:
        def submit(self, *args, wait_for):
            pytest.fail(f"a task run of one shard: {args[:2]}")

    monkeypatch.setattr(fp.stage_shard, "with_options", lambda **kw: _Single())
    pc = pipeline_model().model_validate({"runtime": {"retries": 0, "shards_per_task": 2}})
    futures, done = fp._submit(["ingest", "scenes"], [0, 1, 2, 3, 4], "/tmp/x", pc.model_dump(mode="json"), False,
                               pc.runtime)
    assert done == []
    groups = [(args[0], args[1], args[5]) for args, _, _ in calls]
    assert groups == [("ingest", [0, 1], "00000-00001"), ("ingest", [2, 3], "00002-00003"), ("ingest", [4], "00004"),
                      ("scenes", [0, 1], "00000-00001"), ("scenes", [2, 3], "00002-00003"), ("scenes", [4], "00004")]
    by_group = {(args[0], tuple(args[1])): (waits, fut) for args, waits, fut in calls}
    for (stage, shards), (waits, fut) in by_group.items():
        assert all(futures[(stage, k)] is fut for k in shards)
        assert waits == ([] if stage == "ingest" else [by_group[("ingest", shards)][1]])
    assert fp.shards_label([3, 5, 9]) == "00003,00005,00009"


def test_grouped_task_runs_keep_each_shard_outcome_and_isolate_a_failing_shard(prefect_harness, tmp_path):
    """Five shards, two per task run: every shard that works is written with its own outcome, a shard whose
    stage raises is the run's one failure of that stage (its group's other shard is written), and the next
    stage skips only the shards of the failed group (a group waits for its inputs' group). Task runs are named
    by their shards; the failed one says which shard failed."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    from flows.config import pipeline_model
    from flows.pipeline import _run_graph
    from storage.root import OutputRoot
    from tests._slow_stage import plan

    first, second = f"grp_a_{uuid.uuid4().hex[:6]}", f"grp_b_{uuid.uuid4().hex[:6]}"

    def make(ctx):
        if ctx.shard == 2:
            raise RuntimeError("the source disk went away")
        return [StreamProbe(item=f"x-{ctx.shard}", saw_downstream_start=False)]

    stages = [Stage(name=first, schema=STREAM_SCHEMA, inputs=(), config_cls=StreamProbeConfig, process=make),
              Stage(name=second, schema=STREAM_SCHEMA, inputs=(first,), config_cls=StreamProbeConfig,
                    process=lambda ctx: [StreamProbe(item=f"y-{ctx.shard}", saw_downstream_start=False)])]
    with _registered(stages) as names:
        out = tmp_path / "grouped"
        plan(OutputRoot(str(out)), 5, 1)
        pc = pipeline_model().model_validate({"runtime": {"retries": 0, "max_workers": 2, "shards_per_task": 2}})
        results, failures = _run_graph(str(out), names, [0, 1, 2, 3, 4], pc.model_dump(mode="json"), False,
                                       pc.runtime)
    written = sorted((r["stage"], r["shard"]) for r in results)
    assert written == [(first, 0), (first, 1), (first, 3), (first, 4), (second, 0), (second, 1), (second, 4)]
    assert all(r["action"] == "written" and r["rows"] == 1 for r in results)
    assert [(f["stage"], f["shard"]) for f in failures if f["stage"] == first] == [(first, 2)]
    assert "the source disk went away" in next(f["error"] for f in failures if f["stage"] == first)
    assert sorted(f["shard"] for f in failures if f["stage"] == second) == [2, 3]
    root = OutputRoot(str(out))
    assert root.completed_shards(first) == [0, 1, 3, 4] and root.completed_shards(second) == [0, 1, 4]
    want = [f"{first} / shards 00000-00001", f"{first} / shards 00002-00003", f"{first} / shards 00004"]
    with get_client(sync_client=True) as client:
        runs = eventually(lambda: client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=want))),
                          lambda rs: len(rs) == 3 and all(r.state.is_final() for r in rs))
    states = {r.name: r.state for r in runs}
    assert states[want[0]].is_completed() and states[want[2]].is_completed()
    assert states[want[0]].message.startswith(f"{want[0]}: 2 shards written, 2 rows (2 ok, 0 error, 0 skipped)")
    assert states[want[1]].is_failed() and "shard 00002: RuntimeError: the source disk went away" in \
        states[want[1]].message


def test_a_retried_group_redoes_only_its_failed_shard_even_when_forced(prefect_harness, tmp_path):
    """A group's retry (runtime.retries) re-runs the shard that failed, not the ones it finished; with ``force``
    (which rewrites complete shards) the task run remembers which shards its earlier try finished."""
    from flows.config import pipeline_model
    from flows.pipeline import _run_graph
    from storage.root import OutputRoot
    from tests._slow_stage import plan

    name = f"grp_retry_{uuid.uuid4().hex[:6]}"
    calls: list[int] = []

    def flaky(ctx):
        calls.append(ctx.shard)
        if ctx.shard == 2 and calls.count(2) == 1:
            raise ConnectionError("the endpoint dropped the connection")
        return [StreamProbe(item=f"x-{ctx.shard}", saw_downstream_start=False)]

    stage = Stage(name=name, schema=STREAM_SCHEMA, inputs=(), config_cls=StreamProbeConfig, process=flaky)
    with _registered([stage]) as names:
        out = tmp_path / "retry"
        plan(OutputRoot(str(out)), 4, 1)
        pc = pipeline_model().model_validate({"runtime": {"retries": 1, "retry_delay_s": 0, "max_workers": 1,
                                                          "shards_per_task": 4}})
        results, failures = _run_graph(str(out), names, [0, 1, 2, 3], pc.model_dump(mode="json"), True, pc.runtime)
    assert not failures and sorted(r["shard"] for r in results) == [0, 1, 2, 3]
    assert sorted(calls) == [0, 1, 2, 2, 3]


def test_server_view_reads_the_shards_of_a_grouped_task_run():
    """`motionforge status`'s server view lists (stage, shard)s: a task run of several shards stands for each of
    them, a failed one only for the shards its ShardsFailed message names."""
    from flows.pipeline import ShardsFailed, shards_label
    from flows.server_status import task_run_shards

    assert task_run_shards("track / shard 00007") == ("track", [7])
    assert task_run_shards(f"scenes / shards {shards_label([8, 9, 10])}", "Running") == ("scenes", [8, 9, 10])
    assert task_run_shards(f"tag / shards {shards_label([1, 4])}", "Pending") == ("tag", [1, 4])
    err = ShardsFailed("scenes", [{"shard": 8}], [{"stage": "scenes", "shard": 9, "error": "OSError: disk gone"}], True)
    message = f"Task run encountered an exception ShardsFailed: {err}"
    assert task_run_shards("scenes / shards 00008-00010", "Failed", message) == ("scenes", [9])
    assert task_run_shards("scenes / shards 00008-00010", "Crashed", "worker lost") == ("scenes", [8, 9, 10])
    assert task_run_shards("plan-inputs-f20") is None
