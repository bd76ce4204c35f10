"""Prefect flows: the whole pipeline over shards, and the re-run of one stage.

Unit of work = one (stage, shard) task. A shard of a later stage waits only for the same shard of its
inputs (``wait_for``), so shard 0 can be tracked while shard 5 is still being ingested. Global stages
(e.g. ``finalize``) wait for every shard of their inputs. Tasks pass names, numbers and the config dict,
never models or tables (ARCHITECTURE rule 7).
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NONE  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from experts.base import WeightsNotFoundError  # noqa: E402
from flows.config import load_pipeline_config, pipeline_model  # noqa: E402
from stages import ingest as ingest_stage  # noqa: E402
from stages.registry import available_stages, get_stage, order  # noqa: E402
from stages.runner import InputsNotReadyError, plan_shards, run_shard  # noqa: E402
from storage.lock import RunLock  # noqa: E402
from storage.manifest import read_plan, record_plan, record_stage_config  # noqa: E402
from storage.root import OutputRoot  # noqa: E402

PIPELINE_CONFIG_FILE = "_pipeline.json"
NOT_RETRIED = (InputsNotReadyError, WeightsNotFoundError, ValueError, TypeError, KeyError)


def _retry_condition(task, task_run, state) -> bool:
    """Whole-shard failures are retried (OOM, a flaky endpoint, a lost worker) unless retrying cannot help."""
    try:
        state.result()
    except NOT_RETRIED:
        return False
    except Exception:  # noqa: BLE001
        return True
    return True


@contextlib.contextmanager
def gpu_slot(stage_name: str, limit: str | None):
    """Hold one slot per GPU the stage needs of a Prefect global concurrency limit, if one is configured."""
    gpus = get_stage(stage_name).resources.gpus
    if not limit or gpus <= 0:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(limit, occupy=max(1, int(round(gpus))), strict=True):
        yield


@task(
    name="stage-shard",
    task_run_name="{stage} / shard {shard:05d}",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_jitter_factor=0.5,
    retry_condition_fn=_retry_condition,
    cache_policy=NONE,
)
def stage_shard(stage: str, shard: int, out: str, config: dict[str, Any], force: bool = False) -> dict:
    pc = pipeline_model().model_validate(config)
    root = OutputRoot(out)
    st = get_stage(stage)
    with gpu_slot(stage, pc.runtime.gpu_concurrency_limit):
        outcome = run_shard(st, root, pc.stage_config(stage), shard, force=force, pipeline=config)
    get_run_logger().info(
        "%s / shard %05d: %s, %d rows (%d ok, %d error, %d skipped) in %.1fs", stage, shard, outcome.action,
        outcome.rows, outcome.ok, outcome.error, outcome.skipped, outcome.seconds)
    return outcome.as_dict()


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
    if runtime.task_runner == "ray":
        from prefect_ray import RayTaskRunner

        init = {"include_dashboard": False}
        return RayTaskRunner(address=runtime.ray_address, init_kwargs=init)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=runtime.max_workers)


def _submit(stage_names: list[str], shards: list[int], out: str, cfg: dict, force: bool, runtime) -> dict:
    futures: dict[tuple[str, int], Any] = {}
    opts = stage_shard.with_options(retries=runtime.retries,
                                    retry_delay_seconds=exponential_backoff(backoff_factor=runtime.retry_delay_s))
    for name in stage_names:
        st = get_stage(name)
        if st.scope == "global":
            waits = [f for (s, _), f in futures.items() if s in st.inputs]
            futures[(name, 0)] = opts.submit(name, 0, out, cfg, force, wait_for=waits)
            continue
        for k in shards:
            waits = [futures[(inp, k)] for inp in st.inputs if (inp, k) in futures]
            futures[(name, k)] = opts.submit(name, k, out, cfg, force, wait_for=waits)
    return futures


def _collect(futures: dict) -> tuple[list[dict], list[str]]:
    results, failures = [], []
    for (name, k), fut in futures.items():
        state = fut.wait() or fut.state
        state = fut.state
        if state.is_completed():
            results.append(fut.result())
        else:
            msg = state.message or state.name
            try:
                fut.result()
            except Exception as exc:  # noqa: BLE001
                msg = f"{type(exc).__name__}: {exc}"
            failures.append(f"{name} / shard {k:05d}: {msg}")
    return results, failures


def _summary_text(out: str, results: list[dict], failures: list[str], seconds: float) -> str:
    by_stage: dict[str, dict[str, int]] = {}
    for r in results:
        s = by_stage.setdefault(r["stage"], {"shards": 0, "rows": 0, "ok": 0, "error": 0, "skipped": 0})
        s["shards"] += 1
        for k in ("rows", "ok", "error", "skipped"):
            s[k] += r[k]
    lines = [f"motionforge finished in {seconds:.1f}s; outputs under {out}"]
    for name in order(by_stage):
        s = by_stage[name]
        lines.append(f"  {name:<12} {s['shards']:>4} shards  {s['rows']:>6} rows  ok {s['ok']}  error {s['error']}  skipped {s['skipped']}  -> {OutputRoot(out).uri(name)}")
    for f in failures:
        lines.append(f"  FAILED {f}")
    return "\n".join(lines)


class PipelineFailed(RuntimeError):
    pass


@flow(name="motionforge-pipeline", log_prints=True)
def pipeline(input: str, out: str, config: dict[str, Any] | None = None, stages: list[str] | None = None,
             force: bool = False) -> dict:
    """Run the selected stages (default: all) over every shard of ``input``, writing under ``out``."""
    t0 = time.perf_counter()
    pc = pipeline_model().model_validate(config or {})
    cfg = pc.model_dump(mode="json")
    names = order(stages or available_stages())
    root = OutputRoot(out)
    with RunLock(root, "pipeline run"):
        root.write_json(root.path(PIPELINE_CONFIG_FILE), cfg)
        if "ingest" in names:
            plan_inputs(input, out, pc.ingest.shard_size, list(pc.ingest.extensions))
        shards = plan_shards(root)
        for n in names:
            record_stage_config(root, n, pc.stage_config(n).config_hash(), cfg[n], list(get_stage(n).inputs))
        futures = _submit(names, shards, out, cfg, force, pc.runtime)
        results, failures = _collect(futures)
    text = _summary_text(out, results, failures, time.perf_counter() - t0)
    print(text)
    if failures:
        raise PipelineFailed(f"{len(failures)} stage shard(s) failed:\n" + "\n".join(failures))
    return {"out": out, "results": results, "summary": text}


@flow(name="motionforge-rerun-stage", log_prints=True)
def rerun_stage(out: str, stage: str, shards: list[int] | None = None, force: bool = True,
                config: dict[str, Any] | None = None) -> dict:
    """Re-run one stage for some shards (default all), e.g. after a failure; other stages are untouched."""
    t0 = time.perf_counter()
    root = OutputRoot(out)
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
    with RunLock(root, f"rerun of {stage}"):
        root.write_json(root.path(PIPELINE_CONFIG_FILE), cfg)
        record_stage_config(root, stage, pc.stage_config(stage).config_hash(), cfg[stage], list(st.inputs))
        futures = {}
        for k in todo:
            futures[(stage, k)] = stage_shard.submit(stage, k, out, cfg, force)
        results, failures = _collect(futures)
    text = _summary_text(out, results, failures, time.perf_counter() - t0)
    print(text)
    if failures:
        raise PipelineFailed(f"{len(failures)} shard(s) of {stage} failed:\n" + "\n".join(failures))
    return {"out": out, "results": results, "summary": text}
