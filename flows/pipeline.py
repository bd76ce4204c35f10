"""Prefect flows: the whole pipeline over shards, and the re-run of one stage.

Unit of work = one (stage, shard) task. A shard of a later stage waits only for the same shard of its
inputs (``wait_for``), so shard 0 can be tracked while shard 5 is still being ingested. Global stages
(e.g. ``finalize``) wait for every shard of their inputs. Tasks pass names, numbers and the config dict,
never models or tables (ARCHITECTURE rule 7).

Both flows hand the (stage, shard) graph to the ``motionforge-stages`` subflow, whose task runner comes from
``config.runtime`` (thread pool, or prefect-ray's RayTaskRunner with per-stage ``num_cpus``/``num_gpus``), so
a deployment run from the UI honours the runtime chosen in its parameter form. GPU stages also hold slots of a
Prefect global concurrency limit (one slot per GPU; ``motionforge setup-prefect --gpus N`` creates it).
Each run publishes one table artifact per stage and a summary markdown artifact linking the dataset report.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import os
import re
import socket
import threading
import time
from typing import Any, Literal, Optional

from flows.prefect_api import apply_server_defaults  # noqa: E402

apply_server_defaults()  # before the temporary Prefect server starts

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402

from experts.base import WeightsNotFoundError  # noqa: E402
from flows.config import RuntimeConfig, load_pipeline_config, pipeline_model  # noqa: E402
from flows.server_status import ROOT_TAG_PREFIX, root_tag  # noqa: E402
from stages import ingest as ingest_stage  # noqa: E402
from stages.base import Resources  # noqa: E402
from stages.registry import available_stages, get_stage, order  # noqa: E402
from stages.runner import InputsNotReadyError, complete_outcome, plan_shards, run_shard  # noqa: E402
from stages.shared.reasons import normalise_reason  # noqa: E402
from storage.lock import RunLock  # noqa: E402
from storage.manifest import read_plan, record_plan, record_stage_config  # noqa: E402
from storage.root import OutputRoot, normalise_root_url  # noqa: E402

PIPELINE_CONFIG_FILE = "_pipeline.json"
NOT_RETRIED = (InputsNotReadyError, WeightsNotFoundError, ValueError, TypeError, KeyError)
# Set on a GPU node's worker (``MOTIONFORGE_GPU_LIMIT=motionforge-gpu-node1 prefect worker start ...``) so the flow
# runs it starts take that node's GPU slots when the config names no limit (docs/cluster.md).
GPU_LIMIT_ENV = "MOTIONFORGE_GPU_LIMIT"

# The deployment's parameter schema is built from these annotations: the pipeline config model renders as a
# form in the Prefect UI, and the stage name of ``rerun_stage`` as a drop-down.
PipelineConfig = pipeline_model()
StageName = Literal[tuple(available_stages())] if available_stages() else str  # type: ignore[valid-type]


class PipelineFailed(RuntimeError):
    pass


class GpuLimitMissingError(RuntimeError):
    pass


class ShardsFailed(RuntimeError):
    """Some shards of a task run of several (``runtime.shards_per_task``) failed; the others ran to the end and
    their outcomes travel with this error, so the run's results keep them. ``retryable``: at least one failure
    is of a kind a retry can help (:func:`_retry_condition`)."""

    def __init__(self, stage: str, outcomes: list[dict], failures: list[dict], retryable: bool):
        self.stage, self.outcomes, self.failures, self.retryable = stage, outcomes, failures, retryable
        n = len(outcomes) + len(failures)
        super().__init__(f"{stage}: {len(failures)} of {n} shard(s) failed: "
                         + "; ".join(f"shard {f['shard']:05d}: {f['error']}" for f in failures))

    def __reduce__(self):  # Ray and Prefect pickle it with its parts
        return ShardsFailed, (self.stage, self.outcomes, self.failures, self.retryable)


def _retry_condition(task, task_run, state) -> bool:
    """Whole-shard failures are retried (OOM, a flaky endpoint, a lost worker) unless retrying cannot help."""
    try:
        state.result()
    except ShardsFailed as exc:
        return exc.retryable
    except NOT_RETRIED:
        return False
    except GpuLimitMissingError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return True


def gpu_limit_name(configured: str | None) -> str | None:
    return configured or os.environ.get(GPU_LIMIT_ENV) or None


@contextlib.contextmanager
def gpu_slots(n: int, limit: str | None, what: str, hint: str = ""):
    """Hold ``n`` slots of the Prefect GPU concurrency limit (if one is configured) while the block runs;
    ``what`` names the holder in the error when the limit is missing or too small."""
    limit = gpu_limit_name(limit)
    if not limit or n <= 0:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(concurrency(limit, occupy=n, strict=True))
        except Exception as exc:  # noqa: BLE001 -- Prefect raises several types for a missing/too-small limit
            raise GpuLimitMissingError(
                f"{what} needs {n} slot(s) of the GPU concurrency limit {limit!r}, which the Prefect server at "
                f"{_api_url() or 'the temporary local server'} could not grant ({type(exc).__name__}: {exc}); "
                f"create it with `motionforge setup-prefect --gpus N --gpu-limit {limit}`{hint}"
            ) from exc
        yield


@contextlib.contextmanager
def gpu_slot(stage_name: str, limit: str | None, stage_config: Any = None):
    """Hold one slot per GPU the stage needs of a Prefect global concurrency limit, if one is configured.

    Fractional requests (e.g. 0.25 GPU for a CLIP filter) still take one whole slot: the limit counts GPUs a
    worker may hand out, and sharing a slot between stages is what Ray's fractional ``num_gpus`` is for.
    """
    st = get_stage(stage_name)
    gpus = (st.resources_for(stage_config) if stage_config is not None else st.resources).gpus
    with gpu_slots(max(1, int(round(gpus))) if gpus > 0 else 0, limit, f"stage {stage_name!r}",
                   hint=f", or unset runtime.gpu_concurrency_limit / {GPU_LIMIT_ENV}"):
        yield


def _logger():
    """The run logger inside a flow or task run; a plain logger when a flow's ``.fn`` is called directly."""
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger("motionforge.flows")


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


_VALIDATED: dict[int, tuple[dict, Any]] = {}
_VALIDATED_BY_CONTENT: dict[str, Any] = {}
_VALIDATED_LOCK = threading.Lock()


def validated_config(config: dict[str, Any]) -> Any:
    """The pipeline config model of ``config``, validated once per config and process, not per (stage, shard)
    task. Every task of a flow run on a thread-pool worker gets the same dict, found by identity (the dict is
    held, so its id is not reused); a copy with the same content (Ray pickles the argument for each task) is
    found by its canonical JSON, so a Ray worker process validates each run's config once too."""
    key = id(config)
    with _VALIDATED_LOCK:
        hit = _VALIDATED.get(key)
        if hit is not None and hit[0] is config:
            return hit[1]
    import json

    digest = json.dumps(config, sort_keys=True, default=str)
    with _VALIDATED_LOCK:
        pc = _VALIDATED_BY_CONTENT.get(digest)
    if pc is None:
        pc = pipeline_model().model_validate(config)
    with _VALIDATED_LOCK:
        if len(_VALIDATED) > 32:
            _VALIDATED.clear()
        if len(_VALIDATED_BY_CONTENT) > 32:
            _VALIDATED_BY_CONTENT.clear()
        _VALIDATED[key] = (config, pc)
        _VALIDATED_BY_CONTENT[digest] = pc
    return pc


# What a (stage, shard) task run and a task run of several shards share: retries (runtime.retries and
# retry_delay_s override the first two per run, in _submit), no result cache and no persisted result.
_SHARD_TASK_OPTIONS = dict(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5),
                           retry_jitter_factor=0.5, retry_condition_fn=_retry_condition, cache_policy=NONE,
                           persist_result=False)


@task(name="stage-shard", task_run_name="{stage} / shard {shard:05d}", **_SHARD_TASK_OPTIONS)
def stage_shard(stage: str, shard: int, out: str, config: dict[str, Any], force: bool = False):
    """One (stage, shard). Ends in a Completed state whose message is the outcome line (shown on the task run in
    the UI and in Prefect's "Finished in state" log line) and whose data is the outcome dict, so a task costs one
    log record, not two. ``config`` arrives unwrapped from :func:`prefect.utilities.annotations.quote`
    (see :func:`_submit`)."""
    from prefect.states import Completed

    pc = validated_config(config)
    with gpu_slot(stage, pc.runtime.gpu_concurrency_limit, pc.stage_config(stage)):
        outcome, result = _run_one(pc, stage, shard, out, config, force)
    line = (f"{stage} / shard {shard:05d}: {outcome.action}, {outcome.rows} rows ({outcome.ok} ok, {outcome.error} "
            f"error, {outcome.skipped} skipped) in {outcome.seconds:.1f}s")
    # Prefect maps the id() of a task's result, and of each object one level inside it, to the task run, and
    # records a later task's argument that is one of those objects as an input from that run. The outcome's
    # values are the very objects later tasks get as arguments (the stage's name, a shard number), which drew
    # false edges in the UI's task graph (every "scenes" shard an input of the last one finished); one more
    # level keeps them out of reach. The real dependencies are the ``wait_for`` futures.
    return Completed(message=line, data={"outcome": result})


def _run_one(pc, stage: str, shard: int, out: str, config: dict[str, Any], force: bool):
    """``run_shard`` for one (stage, shard): its outcome, and the outcome as the run's results list it."""
    from flows.api_keys import load_api_keys

    load_api_keys(pc.stage_config(stage))
    started = dt.datetime.now(dt.timezone.utc)
    outcome = run_shard(get_stage(stage), OutputRoot(out), pc.stage_config(stage), shard, force=force, pipeline=config)
    return outcome, _outcome_record(outcome, started, dt.datetime.now(dt.timezone.utc))


_GROUP_DONE: dict[str, dict[int, dict]] = {}  # task run id -> outcomes of its shards done in an earlier try
_GROUP_DONE_LOCK = threading.Lock()


@task(name="stage-shards", task_run_name="{stage} / shards {label}", **_SHARD_TASK_OPTIONS)
def stage_shards(stage: str, shards: list[int], out: str, config: dict[str, Any], force: bool = False,
                 label: str = ""):
    """Several shards of one stage, one after another, in one task run (``runtime.shards_per_task``): each
    written, marked and reported as :func:`stage_shard` would. A shard that raises does not stop the others;
    then the task run fails with :class:`ShardsFailed`, which carries every shard's outcome or error. A retry
    redoes only the failed shards: the others are complete (``run_shard`` skips them), and with ``force`` this
    process remembers which it finished (a retry on another Ray worker redoes them)."""
    from prefect.runtime import task_run
    from prefect.states import Completed

    pc = validated_config(config)
    run_id = str(task_run.id or "")
    with _GROUP_DONE_LOCK:
        done = _GROUP_DONE.setdefault(run_id, {}) if run_id else {}
    outcomes, failures, retryable = [], [], False
    with gpu_slot(stage, pc.runtime.gpu_concurrency_limit, pc.stage_config(stage)):
        for k in shards:
            if k in done:
                outcomes.append(done[k])
                continue
            try:
                _, result = _run_one(pc, stage, k, out, config, force)
            except GpuLimitMissingError:
                raise
            except Exception as exc:  # noqa: BLE001 -- the shard's error; the group's other shards go on
                failures.append({"stage": stage, "shard": k, "error": f"{type(exc).__name__}: {exc}"})
                retryable = retryable or not isinstance(exc, NOT_RETRIED)
                continue
            done[k] = result
            outcomes.append(result)
    if not (failures and retryable and _retry_follows(task_run.run_count)):  # else keep what is done for it
        with _GROUP_DONE_LOCK:
            _GROUP_DONE.pop(run_id, None)
    if failures:
        raise ShardsFailed(stage, outcomes, failures, retryable)
    rows = {k: sum(o.get(k) or 0 for o in outcomes) for k in ("rows", "ok", "error", "skipped")}
    actions = sorted({o.get("action") for o in outcomes})
    line = (f"{stage} / shards {label}: {len(outcomes)} shard{'s' if len(outcomes) != 1 else ''} "
            f"{'/'.join(map(str, actions))}, {rows['rows']} rows "
            f"({rows['ok']} ok, {rows['error']} error, {rows['skipped']} skipped) in "
            f"{sum(o.get('seconds') or 0.0 for o in outcomes):.1f}s")
    return Completed(message=line, data={"outcomes": outcomes})


def _retry_follows(run_count: int) -> bool:
    """Whether the current task run has a retry left after this try (``run_count``: tries so far)."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return ctx is not None and run_count <= ctx.task.retries


def shards_label(shards: list[int]) -> str:
    """``00008-00015`` for a run of consecutive shards, else the list (``00001,00004,00009``)."""
    if len(shards) > 1 and shards == list(range(shards[0], shards[-1] + 1)):
        return f"{shards[0]:05d}-{shards[-1]:05d}"
    return ",".join(f"{k:05d}" for k in shards)


def _outcome_record(outcome, started: dt.datetime, ended: dt.datetime) -> dict[str, Any]:
    """A shard's outcome as the run's results list it (summary, artifacts, report)."""
    return {**outcome.as_dict(), "started_at": started.isoformat(), "ended_at": ended.isoformat(),
            "pid": os.getpid()}


@task(name="plan-inputs", cache_policy=NONE)
def plan_inputs(input: str, out: str, shard_size: int, extensions: list[str]) -> int:
    root = OutputRoot(out)
    uris = ingest_stage.list_inputs(input, extensions)
    if not uris:
        raise FileNotFoundError(f"no videos found in {input!r} (extensions: {', '.join(extensions)})")
    plan = ingest_stage.make_plan(uris, shard_size, read_plan(root))
    plan["input"] = input
    record_plan(root, plan)
    return len(plan["shards"])


def _task_runner(runtime):
    """The task runner ``runtime`` asks for: a thread pool, or Ray (local, or ``ray://head:10001``)."""
    if runtime.task_runner == "ray":
        from prefect_ray import RayTaskRunner

        init: dict[str, Any] = {"include_dashboard": False}
        api = _api_url()
        if runtime.ray_address and api:
            # Workers on other nodes report their task runs to the same server (no secrets travel this way:
            # PREFECT_API_KEY, if any, must be set on the cluster's nodes).
            init["runtime_env"] = {"env_vars": {"PREFECT_API_URL": api}}
        return RayTaskRunner(address=runtime.ray_address, init_kwargs=init)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=runtime.max_workers)


def _ray_cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def ray_remote_options(resources: Resources, cluster_gpus: float) -> dict[str, Any]:
    """Ray request for one (stage, shard) task, from the stage's declared resources.

    ``max_calls=0`` for GPU tasks: Ray's default for a task with ``num_gpus > 0`` is ``max_calls=1`` (the worker
    process exits after one task), which would reload the stage's expert for every shard. With 0 the worker
    process lives on and :func:`experts.base.get_expert` finds the model in its per-process cache.
    On a Ray instance with no GPU at all (a laptop, CI, the ``tiny`` profile) GPU stages request 0 GPUs, or they
    would wait forever.
    """
    gpus = resources.gpus if cluster_gpus > 0 else 0.0
    opts: dict[str, Any] = {"num_cpus": resources.cpus, "num_gpus": gpus}
    if gpus > 0:
        opts["max_calls"] = 0
    return opts


PRECHECK_THREADS = 16  # threads reading markers for the complete-shard check (a remote root answers each in ms)


def _complete_or_none(stage, root: OutputRoot, stage_cfg, shard: int) -> dict | None:
    """The result of a shard that is complete and up to date (``stages.runner.complete_outcome``), else None:
    also when the check itself fails, so the task run that is made instead meets that error and reports it."""
    now = dt.datetime.now(dt.timezone.utc)
    try:
        outcome = complete_outcome(stage, root, stage_cfg, shard)
    except Exception:  # noqa: BLE001 -- e.g. an input shard not complete: the task run raises it properly
        return None
    return None if outcome is None else _outcome_record(outcome, now, dt.datetime.now(dt.timezone.utc))


def _submit(stage_names: list[str], shards: list[int], out: str, cfg: dict, force: bool,
            runtime) -> tuple[dict, list[dict]]:
    """Make a task run for every (stage, shard) that has work to do, waiting for the same shard of its input
    stages (a global stage: for all of them). Returns the futures, and the results of the shards that are
    already complete and up to date, for which no task run is made.

    A shard needs no task run when none of its input shards has one in this run (those would rewrite its
    inputs) and :func:`stages.runner.complete_outcome` finds it complete: the rule ``run_shard`` applies when it
    skips one. The root's lock keeps everything else from changing it meanwhile. Without this a resumed run over
    a big, mostly done root made one task run per done shard (about 14 ms of CPU between the flow process and
    the server, three state events and 26 KiB of server database each), and at 20,000 such task runs within two
    minutes the server's event queues overflowed and dropped some of them (benchmarks/bench_orchestration_scale.py).
    ``force`` makes a task run for every shard."""
    futures: dict[tuple[str, int], Any] = {}
    done: list[dict] = []
    retrying = dict(retries=runtime.retries, retry_delay_seconds=exponential_backoff(backoff_factor=runtime.retry_delay_s))
    opts, group_opts = stage_shard.with_options(**retrying), stage_shards.with_options(**retrying)
    per_task = runtime.shards_per_task
    use_ray = runtime.task_runner == "ray"
    pc = validated_config(cfg)
    resources = {n: get_stage(n).resources_for(pc.stage_config(n)) for n in stage_names}
    if use_ray:
        from prefect_ray.context import remote_options

        cluster_gpus = _ray_cluster_gpus()
        if cluster_gpus <= 0 and any(r.uses_gpu for r in resources.values()):
            _logger().warning("the Ray cluster has no GPU: GPU stages request num_gpus=0 and run on CPU")

    # On the thread pool the config is passed quoted: Prefect then neither walks the whole nested dict for
    # futures on every submission and task start (several ms per task) nor records it as task inputs;
    # dependencies between shards are the explicit ``wait_for`` futures. (prefect-ray hands a quoted argument
    # to the task as a plain tuple, so Ray tasks get the dict itself; Ray's own per-task cost dwarfs the walk.)
    qcfg = quote(cfg)

    def submit(task_opts, name: str, shards, waits: list, *more):
        """``task_opts.submit(name, shards, out, config, force, *more)``: one shard (``stage_shard``) or a list of
        them (``stage_shards``, whose ``more`` is the label)."""
        if not use_ray:
            return task_opts.submit(name, shards, out, qcfg, force, *more, wait_for=waits)
        with remote_options(**ray_remote_options(resources[name], cluster_gpus)):
            return task_opts.submit(name, shards, out, cfg, force, *more, wait_for=waits)

    root = OutputRoot(out)
    with _task_tags_without_root(), concurrent.futures.ThreadPoolExecutor(
            PRECHECK_THREADS, thread_name_prefix="precheck") as pool:
        for name in stage_names:
            st = get_stage(name)
            if st.scope == "global":
                waits = {0: [f for (s, _), f in futures.items() if s in st.inputs]}
            else:
                waits = {k: [futures[(inp, k)] for inp in st.inputs if (inp, k) in futures] for k in shards}
            quiet = [] if force else [k for k, w in waits.items() if not w]
            check = (lambda k, st=st, c=pc.stage_config(name): _complete_or_none(st, root, c, k))
            # a remote root answers each marker read in milliseconds: threads overlap them; a local one in
            # microseconds, where 16 threads only contend for the GIL (1,500 shards of 15 stages: 260 -> 80 us each)
            complete = dict(zip(quiet, map(check, quiet) if root.is_local else pool.map(check, quiet)))
            todo = []
            for k, w in waits.items():
                if complete.get(k) is not None:
                    done.append(complete[k])
                else:
                    todo.append(k)
            if per_task == 1 or st.scope == "global":
                for k in todo:
                    futures[(name, k)] = submit(opts, name, k, waits[k])
            else:  # each group waits for the task runs of its shards' inputs, each of them once
                for i in range(0, len(todo), per_task):
                    group = todo[i:i + per_task]
                    w = list({id(f): f for k in group for f in waits[k]}.values())
                    fut = submit(group_opts, name, group, w, shards_label(group))
                    for k in group:
                        futures[(name, k)] = fut
            n_done = sum(r is not None for r in complete.values())
            if n_done:
                _logger().info("%s: %d of %d shard(s) already complete and up to date, no task run for them",
                               name, n_done, len(waits))
    return futures, done


@contextlib.contextmanager
def _task_tags_without_root():
    """Submit the (stage, shard) task runs without the root's tag (:func:`root_tag`), other tags kept.

    Prefect enforces tag concurrency limits on every task run that has a tag: two server calls per task run
    (take a slot with a lease, release it), whether or not a limit exists for the tag. The root's tag only
    has to be on flow runs (the sweep finds those by tag and their task runs by flow run), so task runs leave
    it off. A user's own tags stay, so their tag concurrency limits still apply."""
    from prefect.context import TagsContext

    kept = {t for t in TagsContext.get().current_tags or () if not t.startswith(ROOT_TAG_PREFIX)}
    with TagsContext(current_tags=kept):
        yield


def _collect(futures: dict) -> tuple[list[dict], list[dict]]:
    """Outcomes of finished shards, and ``{stage, shard, error}`` for the ones that failed. Empties ``futures``:
    each is dropped once read, so the final states of finished task runs are freed as the collection goes (in
    submission order, about the order they finish) rather than all held until the run ends; a run at scale
    has tens of thousands."""
    results, failures = [], []
    shards_of: dict[int, list[int]] = {}  # a task run of several shards (runtime.shards_per_task): its shards
    for name, k in futures:
        shards_of.setdefault(id(futures[(name, k)]), []).append(k)
    for name, k in list(futures):
        fut = futures.pop((name, k))
        group = shards_of.pop(id(fut), None)
        if group is None:  # read already, under its first shard
            continue
        fut.wait()
        state = fut.state
        if state.is_completed():
            data = fut.result()
            results.extend(data["outcomes"] if "outcomes" in data else [data["outcome"]])
            continue
        msg = state.message or state.name
        try:
            fut.result()
        except ShardsFailed as exc:
            results.extend(exc.outcomes)
            failures.extend(exc.failures)
            continue
        except Exception as exc:  # noqa: BLE001
            msg = f"{type(exc).__name__}: {exc}"
        failures.extend({"stage": name, "shard": s, "error": msg} for s in group)
    return results, failures


def _failure_line(f: dict) -> str:
    return f"{f['stage']} / shard {f['shard']:05d}: {f['error']}"


def _stage_totals(results: list[dict]) -> dict[str, dict[str, float]]:
    by_stage: dict[str, dict[str, float]] = {}
    for r in results:
        s = by_stage.setdefault(r["stage"], {"shards": 0, "rows": 0, "ok": 0, "error": 0, "skipped": 0, "seconds": 0.0})
        s["shards"] += 1
        for k in ("rows", "ok", "error", "skipped", "seconds"):
            s[k] += r[k]
    return by_stage


def _summary_text(out: str, results: list[dict], failures: list[dict], seconds: float) -> str:
    by_stage = _stage_totals(results)
    lines = [f"motionforge finished in {seconds:.1f}s; outputs under {out}"]
    for name in order(by_stage):
        s = by_stage[name]
        lines.append(f"  {name:<12} {s['shards']:>4} shards  {s['rows']:>6} rows  ok {s['ok']}  error {s['error']}  skipped {s['skipped']}  -> {OutputRoot(out).uri(name)}")
    for f in failures:
        lines.append(f"  FAILED {_failure_line(f)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- Prefect UI artifacts

def artifact_key(*parts: str) -> str:
    """Artifact keys allow lower-case letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(("motionforge",) + parts).lower()).strip("-")


def _items_per_s(rows: float, seconds: float) -> float:
    return round(rows / seconds, 2) if seconds > 0 else 0.0


# Rows of a stage's table artifact at most. A row is about 170 bytes: 10,000 shards made a 1.6 MB table, which
# the UI renders slowly and whose creation event the Prefect server refuses (its events stop at 1.5 MB).
TABLE_ROWS = 1000


def stage_table(stage: str, results: list[dict], failures: list[dict]) -> tuple[list[dict], str]:
    """Rows (one per shard, at most :data:`TABLE_ROWS`: failed shards first, then written ones) and a markdown
    description (totals over every shard) for the stage's table artifact."""
    rows = []
    for r in sorted((r for r in results if r["stage"] == stage), key=lambda r: r["shard"]):
        rows.append({
            "shard": r["shard"], "result": r["action"], "rows": r["rows"], "ok": r["ok"], "error": r["error"],
            "skipped": r["skipped"], "seconds": round(r["seconds"], 3),
            # a shard skipped as complete computed nothing: its rows over the skip check's time are no throughput
            "items_per_s": _items_per_s(r["rows"], r["seconds"]) if r["action"] == "written" else None,
            "top_errors": "; ".join(f"{reason} (x{n})" for reason, n in r["top_errors"]),
        })
    for f in sorted((f for f in failures if f["stage"] == stage), key=lambda f: f["shard"]):
        rows.append({"shard": f["shard"], "result": "FAILED", "rows": 0, "ok": 0, "error": 0, "skipped": 0,
                     "seconds": 0.0, "items_per_s": 0.0, "top_errors": f["error"][:300]})
    written = [r for r in results if r["stage"] == stage and r["action"] == "written"]
    t = _stage_totals(written).get(stage, {"rows": 0, "seconds": 0.0})
    reasons: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in results:
        if r["stage"] == stage:
            for reason, n in r["top_errors"]:
                cause = normalise_reason(reason)  # the same cause in several shards counts once, with its first message
                reasons[cause] = reasons.get(cause, 0) + n
                examples.setdefault(cause, reason)
    ok = sum(r["ok"] for r in rows)
    err = sum(r["error"] for r in rows)
    failed = sum(1 for r in rows if r["result"] == "FAILED")
    desc = [f"**{stage}**: {len(rows)} shards ({failed} failed), rows ok {ok}, error {err}; "
            f"throughput {_items_per_s(t['rows'], t['seconds'])} items/s over the shards computed in this run"]
    if reasons:
        desc.append("Top error reasons: " + "; ".join(f"{examples[k]} (x{v})" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]))
    if len(rows) > TABLE_ROWS:
        rank = {"FAILED": 0, "written": 1}
        kept = {id(r) for r in sorted(rows, key=lambda r: (rank.get(r["result"], 2), r["shard"]))[:TABLE_ROWS]}
        desc.append(f"The table lists {TABLE_ROWS:,} of the {len(rows):,} shards: the failed ones, then the ones "
                    f"written in this run, by shard. `motionforge status` and the dataset report count them all.")
        rows = [r for r in rows if id(r) in kept]
    return rows, "\n\n".join(desc)


def _report_link(out: str) -> str:
    """Write the dataset report and return markdown for the run summary: a link the browser can open (the
    report served by `motionforge review serve` at $MOTIONFORGE_REPORT_URL) and the key numbers inline, never
    a file:// path (the UI cannot open those)."""
    from dashboards.report import REPORT_URL_ENV, collect, summary_markdown, write_report

    try:
        data = collect(out)
        path = write_report(out, data=data) if OutputRoot(out).is_local else None
        return summary_markdown(data, out, path, os.environ.get(REPORT_URL_ENV))
    except Exception as exc:  # noqa: BLE001 -- a report failure must not fail the data run
        _logger().warning("dataset report not written: %s: %s", type(exc).__name__, exc)
        return f"dataset report not written ({type(exc).__name__}: {exc}); run `motionforge report --out {out}`"


def publish_artifacts(out: str, stage_names: list[str], results: list[dict], failures: list[dict], seconds: float,
                      what: str) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:  # a flow's .fn called directly (tests, notebooks): no run to attach to
        return
    for name in order(stage_names):
        if not any(r["stage"] == name for r in results) and not any(f["stage"] == name for f in failures):
            continue
        rows, desc = stage_table(name, results, failures)
        create_table_artifact(table=rows, key=artifact_key(name), description=desc)
    by_stage = _stage_totals(results)
    computed = _stage_totals([r for r in results if r["action"] == "written"])
    md = [f"# motionforge {what}", "", f"Output root: `{out}`, {seconds:.1f}s.", "", _report_link(out), "",
          "| stage | shards | rows | ok | error | skipped | items/s |", "|---|---|---|---|---|---|---|"]
    for name in order(by_stage):
        s = by_stage[name]
        md.append(f"| {name} | {s['shards']} | {s['rows']} | {s['ok']} | {s['error']} | {s['skipped']} | "
                  f"{_items_per_s(c['rows'], c['seconds']) if (c := computed.get(name)) else '-'} |")
    if failures:
        md += ["", f"## {len(failures)} failed stage shard(s)", ""]
        md += [f"- `{_failure_line(f)[:500]}`" for f in failures]
        md += ["", "Re-run one from the UI with the `motionforge-rerun-stage/rerun-stage` deployment "
               "(parameters: out, stage, shards), or `motionforge run-stage STAGE --out ROOT --shard K`."]
    create_markdown_artifact(markdown="\n".join(md), key=artifact_key("summary"), description=f"motionforge {what} of {out}")


# ---------------------------------------------------------------- flows

def _short_stages(names: list[str] | None) -> str:
    names = list(names or [])
    if not names:
        return "all stages"
    return ",".join(names) if len(names) <= 3 else f"{names[0]}..{names[-1]} ({len(names)} stages)"


def _root_label(out: str) -> str:
    return os.path.basename(str(out).rstrip("/")) or str(out)


def _shards_label(shards: list[int] | None) -> str:
    if not shards:
        return "all shards"
    if len(shards) == 1:
        return f"shard {shards[0]:05d}"
    return "shards " + ",".join(f"{s:05d}" for s in shards[:4]) + (" ..." if len(shards) > 4 else "")


def _pipeline_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"pipeline {_short_stages(p.get('stages'))} -> {_root_label(p.get('out', ''))}"


def _stages_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"{_short_stages(p.get('stage_names'))} / {_shards_label(p.get('shards'))}"


def _rerun_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"rerun {p.get('stage')} / {_shards_label(p.get('shards'))} -> {_root_label(p.get('out', ''))}"


@flow(name="motionforge-stages", flow_run_name=_stages_run_name)
def run_stages(out: str, stage_names: list[str], shards: list[int], config: dict[str, Any], force: bool = False) -> dict:
    """The (stage, shard) graph, on the task runner this flow was given (see :func:`_run_graph`)."""
    runtime = RuntimeConfig.model_validate(config.get("runtime") or {})
    futures, done = _submit(stage_names, shards, out, config, force, runtime)
    results, failures = _collect(futures)
    return {"results": done + results, "failures": failures}


def _run_graph(out: str, stage_names: list[str], shards: list[int], cfg: dict, force: bool, runtime) -> tuple[list, list]:
    from prefect import tags

    sub = run_stages.with_options(task_runner=_task_runner(runtime))
    with tags(root_tag(out)):  # the stage graph's run is findable by root too (its task runs by their flow run)
        res = sub(out=out, stage_names=stage_names, shards=shards, config=cfg, force=force)
    return res["results"], res["failures"]


def _as_pipeline_config(config):
    model = pipeline_model()
    if config is None:
        return model()
    if isinstance(config, model):
        return config
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    return model.model_validate(config)


def _flow_run_info() -> dict[str, Any]:
    """What the run lock records about this flow run, so a later run can mark it crashed if this one dies."""
    from prefect.runtime import flow_run

    return {"flow_run_id": str(flow_run.id) if flow_run.id else None, "api_url": _api_url()}


def mark_dead_run_crashed(holder: dict | None) -> str | None:
    """Set the flow run recorded by a dead lock holder to Crashed on the Prefect server, with its subflow runs
    (the stage graph) and their task runs that were still running or pending there. Returns what was done, for
    the log; never fails the new run."""
    run_id = (holder or {}).get("flow_run_id")
    if not run_id:
        return None
    import uuid as _uuid

    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    msg = (f"process {holder.get('pid')} on {holder.get('host')} died while holding the run lock; marked crashed "
           f"by the run that took the lock over")
    try:
        with get_client(sync_client=True) as client:
            fr = client.read_flow_run(_uuid.UUID(run_id))
            if fr.state is not None and fr.state.is_final():
                return f"flow run {run_id} of the dead run is already {fr.state.name}"
            marked, open_tasks = _crash_with_children(client, [fr], msg)
            return (f"marked flow run {run_id} ({fr.name}) of the dead run as Crashed, with {marked - 1} subflow "
                    f"run(s) and {open_tasks} unfinished task run(s)")
    except ObjectNotFound:
        return f"flow run {run_id} of the dead run is not on this Prefect server ({_api_url() or 'temporary server'})"
    except Exception as exc:  # noqa: BLE001 -- bookkeeping on the server must not stop the data run
        return f"could not mark flow run {run_id} of the dead run as Crashed: {type(exc).__name__}: {exc}"


PROCESS_LABEL = "motionforge.process"


def _process_id() -> str:
    """``host:pid`` of this process, kept in the flow run's :data:`PROCESS_LABEL` label."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _claim_root(out: str) -> None:
    """Label this flow run on the server as working on ``out`` (its :func:`root_tag`) from this process (the
    :data:`PROCESS_LABEL` label), first thing in the flow, before it waits for the root's lock.

    A CLI run already has the tag from its creation (``motionforge run``/``run-stage`` create it inside
    ``prefect.tags``), so a kill at any point leaves it findable; a deployment run or a direct Python call gets
    it here. One or two small server calls; never fails the run."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    fr = ctx.flow_run if ctx is not None else None
    if fr is None:
        return
    tag = root_tag(out)
    tags = list(fr.tags or [])
    try:
        from prefect import get_client

        with get_client(sync_client=True) as client:
            if tag not in tags:
                client.update_flow_run(fr.id, tags=tags + [tag])
                fr.tags = tags + [tag]
            client.update_flow_run_labels(fr.id, {PROCESS_LABEL: _process_id()})
    except Exception as exc:  # noqa: BLE001 -- a label on the server must not stop the data run
        _logger().warning("could not tag flow run %s with its output root (%s: %s); if this run is killed, a later "
                          "run on %s may not mark it crashed", fr.id, type(exc).__name__, exc, out)


def _alive_here(run) -> bool:
    """Whether a flow run's process (its :data:`PROCESS_LABEL`, ``host:pid``) is alive on this host: then it is a
    run that has not reached the lock yet (and will stop there), not a dead one."""
    from storage.lock import _alive

    host, _, pid = str((getattr(run, "labels", None) or {}).get(PROCESS_LABEL, "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return _alive(int(pid))


UNFINISHED_STATE_TYPES = ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"]  # every state type but final ones


def _crash_with_children(client, runs: list, msg: str) -> tuple[int, int]:
    """Set ``runs``, their unfinished subflow runs (any depth) and their unfinished task runs to Crashed."""
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter, TaskRunFilterFlowRunId, TaskRunFilterState,
        TaskRunFilterStateType)
    from prefect.states import Crashed

    from flows.prefect_api import read_all

    todo, seen = list(runs), {r.id for r in runs}
    frontier = [r.id for r in runs]
    while frontier:  # the stage graph is one level down; deeper nesting is followed too
        kids = [k for k in read_all(client.read_flow_runs, flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))) if k.id not in seen]
        seen.update(k.id for k in kids)
        todo += kids
        frontier = [k.id for k in kids]
    marked = 0
    for r in todo:
        if r.state is None or not r.state.is_final():
            client.set_flow_run_state(r.id, Crashed(message=msg), force=True)
            marked += 1
    # Only the unfinished task runs, asked of the server and read page by page: the finished ones of a big run
    # are tens of thousands, and the open ones can be anywhere among them.
    open_tasks = read_all(client.read_task_runs, task_run_filter=TaskRunFilter(
        flow_run_id=TaskRunFilterFlowRunId(any_=[r.id for r in todo]),
        state=TaskRunFilterState(type=TaskRunFilterStateType(any_=UNFINISHED_STATE_TYPES))))
    for t in open_tasks:
        client.set_task_run_state(t.id, Crashed(message=msg), force=True)
    return marked, len(open_tasks)


def _own_lineage(client, fr) -> set:
    """This flow run's id and its ancestors' (a pipeline started as a subflow of another flow)."""
    ids = {fr.id}
    parent_task = fr.parent_task_run_id
    while parent_task is not None and len(ids) < 32:
        parent = client.read_task_run(parent_task).flow_run_id
        if parent is None or parent in ids:
            break
        ids.add(parent)
        parent_task = client.read_flow_run(parent).parent_task_run_id
    return ids


def mark_root_runs_crashed(out: str, why: str = "") -> str | None:
    """Called while holding the root's lock: set every flow run on the server tagged with this root that is still
    Running, Pending or Cancelling (Scheduled runs have not started and are left alone), other than this run, its
    ancestors and its own subflows, to Crashed, with their unfinished subflows and task runs. No other process can
    be working on the root, so such runs were killed (before they recorded themselves in the lock, during a
    takeover, or earlier in a chain of kills). A run whose recorded process is still alive on this host has not
    reached the lock yet (it will stop there) and is left alone.

    Costs one filtered query when nothing is left over. Returns what was done, for the log; never fails the run."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags)
    from prefect.client.schemas.objects import StateType
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    me = ctx.flow_run if ctx is not None else None
    tag = root_tag(out)
    try:
        with get_client(sync_client=True) as client:
            found = client.read_flow_runs(limit=200, flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=[tag]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]))))
            if me is not None:
                found = [r for r in found if r.id != me.id]
            if not found:
                return None
            mine = _own_lineage(client, me) if me is not None else set()
            parent_of = {r.id: client.read_task_run(r.parent_task_run_id).flow_run_id
                         for r in found if r.parent_task_run_id is not None}
            orphans = [r for r in found if r.id not in mine and parent_of.get(r.id) not in mine  # not a subflow of ours
                       and not _alive_here(r)]
            if not orphans:
                return None
            ids = {r.id for r in orphans}
            tops = [r for r in orphans if parent_of.get(r.id) not in ids]  # the others go with their parent
            who = f"flow run {me.name!r} ({me.id})" if me is not None else f"process {_process_id()}"
            marked = tasks = 0
            for r in tops:
                msg = (f"marked Crashed by {who}, which holds the run lock on {normalise_root_url(out)}: this run "
                       f"was still {r.state.name if r.state else 'without a state'} on the server, but no process is "
                       f"working on that root any more (killed or lost)" + (f"; {why}" if why else ""))
                m, t = _crash_with_children(client, [r], msg)
                marked, tasks = marked + m, tasks + t
            names = ", ".join(f"{r.name} ({r.id})" for r in tops[:5]) + (" ..." if len(tops) > 5 else "")
            return (f"marked {len(tops)} flow run(s) left unfinished on this root as Crashed: {names}; with their "
                    f"subflow runs {marked} flow run(s) and {tasks} unfinished task run(s) in all")
    except Exception as exc:  # noqa: BLE001 -- bookkeeping on the server must not stop the data run
        return f"could not check for flow runs left unfinished on {out}: {type(exc).__name__}: {exc}"


def _take_root(root: OutputRoot, lock: RunLock, shards: list[int] | None) -> None:
    """Housekeeping once the lock is ours: the dead runs' flow runs, their temp files, shards outside the plan."""
    log = _logger()
    if lock.taken_over is not None:
        note = mark_dead_run_crashed(lock.taken_over)
        if note:
            log.warning(note)
    note = mark_root_runs_crashed(root.url, "the run lock was taken over from a dead holder"
                                  if lock.taken_over is not None else "")
    if note:
        log.warning(note)
    removed = root.remove_temp_files(lock)
    if removed:
        log.info("removed %d temp file(s) left by an interrupted run", len(removed))
    if shards is None:
        return
    keep = set(shards)
    for name in root.stages_present():
        try:
            st = get_stage(name)
        except Exception:  # noqa: BLE001 -- a folder that is no registered stage is not ours to prune
            continue
        if st.scope == "global":
            continue
        gone = root.prune_shards(lock, name, keep)
        if gone:
            log.warning("%s: removed shard(s) %s, which are not in the root's shard plan (left by an earlier plan)",
                        name, gone)


def _keep_shard_plan(root: OutputRoot, pc):
    """An existing root keeps the shard size it was planned with: re-sharding would leave every stage's old
    shards beside the new ones (or throw away all finished work). A different request is logged and ignored."""
    plan = read_plan(root)
    if plan and plan.get("shard_size") not in (None, pc.ingest.shard_size):
        _logger().warning(
            "%s was planned with shard size %s; keeping it (this run's config says %s). To re-shard, run into a new --out.",
            root.url, plan["shard_size"], pc.ingest.shard_size)
        cfg = pc.model_dump(mode="json")
        cfg["ingest"]["shard_size"] = plan["shard_size"]
        return pipeline_model().model_validate(cfg)
    return pc


@flow(name="motionforge-pipeline", flow_run_name=_pipeline_run_name, log_prints=True)
def pipeline(input: str, out: str, config: Optional[PipelineConfig] = None, stages: Optional[list[StageName]] = None,
             force: bool = False) -> dict:
    """Run the selected stages (default: all) over every shard of ``input``, writing under ``out``."""
    t0 = time.perf_counter()
    pc = _as_pipeline_config(config)
    names = order(stages or available_stages())
    root = OutputRoot(out)
    _claim_root(root.url)
    with RunLock(root, "pipeline run", info=_flow_run_info()) as lock:
        pc = _keep_shard_plan(root, pc)
        cfg = pc.model_dump(mode="json")
        existing = read_plan(root)
        _take_root(root, lock, list(range(len(existing["shards"]))) if existing else None)
        root.write_json(root.path(PIPELINE_CONFIG_FILE), cfg)
        if "ingest" in names:
            plan_inputs(input, out, pc.ingest.shard_size, list(pc.ingest.extensions))
        shards = plan_shards(root)
        for n in names:
            record_stage_config(root, n, pc.stage_config(n).config_hash(), cfg[n], list(get_stage(n).inputs))
        results, failures = _run_graph(out, names, shards, cfg, force, pc.runtime)
    seconds = time.perf_counter() - t0
    text = _summary_text(out, results, failures, seconds)
    print(text)
    publish_artifacts(out, names, results, failures, seconds, "pipeline run")
    if failures:
        raise PipelineFailed(f"{len(failures)} stage shard(s) failed:\n" + "\n".join(map(_failure_line, failures)))
    return {"out": out, "results": results, "summary": text}


@flow(name="motionforge-rerun-stage", flow_run_name=_rerun_run_name, log_prints=True)
def rerun_stage(out: str, stage: StageName, shards: Optional[list[int]] = None, force: bool = True,
                config: Optional[dict[str, Any]] = None, save_config: bool = False) -> dict:
    """Re-run one stage for some shards (default all), e.g. after a failure; other stages are untouched.

    ``config`` holds overrides on top of the config the root was last run with (e.g. ``{"runtime": {...}}``).
    They apply to this re-run only, unless ``save_config`` stores the merged config as the root's config (what
    later re-runs start from).
    """
    t0 = time.perf_counter()
    root = OutputRoot(out)
    _claim_root(root.url)
    stored = root.read_json(root.path(PIPELINE_CONFIG_FILE), default=None)
    if stored is None and config is None:
        raise FileNotFoundError(f"{out} has no {PIPELINE_CONFIG_FILE}; run the pipeline on it first")
    pc = load_pipeline_config(base=stored or {}, overrides=config or {})
    cfg = pc.model_dump(mode="json")
    st = get_stage(stage)
    all_shards = [0] if st.scope == "global" else plan_shards(root)
    todo = all_shards if not shards else [s for s in shards if s in all_shards]
    if shards and len(todo) != len(shards):
        raise ValueError(f"shards {sorted(set(shards) - set(todo))} are not in {out}'s plan (0..{len(all_shards) - 1})")
    with RunLock(root, f"rerun of {stage}", info=_flow_run_info()) as lock:
        _take_root(root, lock, None)
        if save_config:
            root.write_json(root.path(PIPELINE_CONFIG_FILE), cfg)
        elif config:
            _logger().info("config overrides apply to this re-run only (not saved to %s)", PIPELINE_CONFIG_FILE)
        record_stage_config(root, stage, pc.stage_config(stage).config_hash(), cfg[stage], list(st.inputs))
        results, failures = _run_graph(out, [stage], todo, cfg, force, pc.runtime)
    seconds = time.perf_counter() - t0
    text = _summary_text(out, results, failures, seconds)
    print(text)
    publish_artifacts(out, [stage], results, failures, seconds, f"re-run of {stage}")
    if failures:
        raise PipelineFailed(f"{len(failures)} shard(s) of {stage} failed:\n" + "\n".join(map(_failure_line, failures)))
    return {"out": out, "results": results, "summary": text}
