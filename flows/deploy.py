"""Prefect set-up for a cluster: work pools, the GPU concurrency limit, and the motionforge deployments.

Layout (docs/cluster.md): a ``process`` work pool for CPU work and one for GPU nodes; a global concurrency
limit with one slot per GPU that GPU stages hold while they run (:func:`flows.pipeline.gpu_slot`); three
deployments registered from this project's source:

* ``motionforge-pipeline/pipeline``          the whole pipeline; its parameter form is the pipeline config
                                             model; carries a cron schedule that is off until you turn it on;
* ``motionforge-rerun-stage/rerun-stage``     one stage for a list of shards (stage, shards, force), on the
                                             CPU pool;
* ``motionforge-rerun-stage/rerun-stage-gpu`` the same on the GPU pool (only with a GPU pool);
* ``motionforge-train/train``                 fine-tune a VLM on an output root's iMOVE-IT samples (flows/train.py);
                                             its form is the training config; holds GPU slots while training;
* ``motionforge-eval/eval``                   score a trained checkpoint (iMOVE-IT held-out split, Charades-STA).

Training and evaluation go to the GPU pool when there is one, else to the CPU pool.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

PIPELINE_FLOW = "motionforge-pipeline"
RERUN_FLOW = "motionforge-rerun-stage"
PIPELINE_DEPLOYMENT = "pipeline"
RERUN_DEPLOYMENT = "rerun-stage"
RERUN_GPU_DEPLOYMENT = "rerun-stage-gpu"
TRAIN_FLOW = "motionforge-train"
EVAL_FLOW = "motionforge-eval"
TRAIN_DEPLOYMENT = "train"
EVAL_DEPLOYMENT = "eval"
DEFAULT_CPU_POOL = "motionforge-cpu"
DEFAULT_GPU_POOL = "motionforge-gpu"
DEFAULT_GPU_LIMIT = "motionforge-gpu"
DEFAULT_CRON = "0 2 * * *"  # nightly at 02:00; registered inactive, switch it on in the UI or with --schedule-active


class PrefectSetupError(RuntimeError):
    pass


def project_source() -> str:
    """The directory that holds ``flows/``: what process workers run the flows from."""
    import flows

    return str(Path(flows.__file__).resolve().parent.parent)


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def require_api_url() -> str:
    url = api_url()
    if not url:
        raise PrefectSetupError(
            "PREFECT_API_URL is not set, so there is no Prefect server to register with; start one "
            "(`prefect server start --host 0.0.0.0`) and `export PREFECT_API_URL=http://HOST:4200/api`"
        )
    return url


def gpu_limit_for_node(base: str, node: str | None) -> str:
    return f"{base}-{node}" if node else base


@dataclasses.dataclass(frozen=True)
class SetupResult:
    pools: dict[str, str]  # name -> "created" | "exists"
    gpu_limit: str | None
    gpu_slots: int
    limit_action: str  # created | updated | unchanged | none


def ensure_work_pool(client, name: str, description: str) -> str:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        pool = client.read_work_pool(name)
    except ObjectNotFound:
        client.create_work_pool(WorkPoolCreate(
            name=name, type="process", description=description,
            base_job_template=ProcessWorker.get_default_base_job_template()))
        return "created"
    if pool.type != "process":
        raise PrefectSetupError(f"work pool {name!r} exists with type {pool.type!r}; motionforge needs a 'process' "
                                f"pool: delete it (`prefect work-pool delete {name}`) or pass another --pool name")
    return "exists"


def ensure_gpu_limit(client, name: str, slots: int) -> str:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    try:
        current = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots, active=True))
        return "created"
    if current.limit == slots and current.active:
        return "unchanged"
    client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=slots, active=True))
    return "updated"


def setup_prefect(gpus: int, cpu_pool: str = DEFAULT_CPU_POOL, gpu_pool: str | None = DEFAULT_GPU_POOL,
                  gpu_limit: str = DEFAULT_GPU_LIMIT, node: str | None = None) -> SetupResult:
    """Create (or check) the work pools and the GPU concurrency limit; safe to run again."""
    from prefect import get_client

    if gpus < 0:
        raise PrefectSetupError(f"--gpus must be 0 or more, got {gpus}")
    require_api_url()
    pools: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        pools[cpu_pool] = ensure_work_pool(client, cpu_pool, "motionforge: CPU stages and orchestration")
        if gpu_pool and gpus > 0:
            pools[gpu_pool] = ensure_work_pool(client, gpu_pool, "motionforge: flow runs on GPU nodes")
        limit = gpu_limit_for_node(gpu_limit, node) if gpus > 0 else None
        action = ensure_gpu_limit(client, limit, gpus) if limit else "none"
    return SetupResult(pools=pools, gpu_limit=limit, gpu_slots=gpus, limit_action=action)


def require_work_pools(names: list[str]) -> None:
    """Every named work pool exists on the server, or a :class:`PrefectSetupError` saying how to create it."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    missing = []
    try:
        with get_client(sync_client=True) as client:
            for name in dict.fromkeys(names):
                try:
                    client.read_work_pool(name)
                except ObjectNotFound:
                    missing.append(name)
    except PrefectSetupError:
        raise
    except Exception as exc:  # noqa: BLE001 -- connection refused, bad URL, auth: say which server and why
        raise PrefectSetupError(f"cannot reach the Prefect server at {api_url()}: {type(exc).__name__}: {exc}") from exc
    if missing:
        pools = ", ".join(repr(m) for m in missing)
        raise PrefectSetupError(
            f"work pool(s) {pools} do not exist on the Prefect server at {api_url()}; create them first with "
            f"`motionforge setup-prefect --gpus N --pool CPU_POOL --gpu-pool GPU_POOL` (or `prefect work-pool create "
            f"NAME --type process`), or pass an existing pool with --pool / --gpu-pool")


def pipeline_parameters(profile: str, input: str | None, out: str | None, gpu_limit: str | None,
                        config_file: str | None = None) -> dict[str, Any]:
    """Default parameters of the pipeline deployment: the profile's whole config, so the UI form shows the
    values that will run (editing a field in the form changes exactly that field)."""
    from flows.config import load_pipeline_config

    overrides = {"runtime": {"gpu_concurrency_limit": gpu_limit}} if gpu_limit else {}
    pc = load_pipeline_config(profile, config_file, overrides)
    params: dict[str, Any] = {"config": pc.model_dump(mode="json")}
    if input:
        params["input"] = input
    if out:
        params["out"] = out
    return params


@dataclasses.dataclass(frozen=True)
class DeployedDeployment:
    name: str  # flow-name/deployment-name, what `prefect deployment run` and run_deployment take
    id: str
    work_pool: str


def deploy(pool: str = DEFAULT_CPU_POOL, gpu_pool: str | None = None, *, profile: str = "paper",
           input: str | None = None, out: str | None = None, gpu_limit: str | None = None,
           config_file: str | None = None, cron: str = DEFAULT_CRON, schedule_active: bool = False,
           timezone: str = "UTC", source: str | None = None, tags: list[str] | None = None) -> list[DeployedDeployment]:
    """Register the pipeline and rerun-stage deployments from ``source`` (default: this project's directory,
    which every worker node must see at the same path; or a git URL)."""
    from prefect import flow as prefect_flow
    from prefect.schedules import Cron

    require_api_url()
    source = source or project_source()
    if schedule_active and not (input and out):
        raise PrefectSetupError("an active schedule needs --input and --out: a scheduled run has nobody to fill "
                                "in the form")
    tags = list(tags or ["motionforge"])
    pipeline_pool = gpu_pool or pool
    require_work_pools([p for p in (pool, gpu_pool) if p])
    out_list: list[DeployedDeployment] = []

    pipe = prefect_flow.from_source(source=source, entrypoint="flows/pipeline.py:pipeline")
    dep_id = pipe.deploy(
        name=PIPELINE_DEPLOYMENT, work_pool_name=pipeline_pool, build=False, push=False,
        parameters=pipeline_parameters(profile, input, out, gpu_limit, config_file),
        schedules=[Cron(cron, timezone=timezone, active=schedule_active, slug="nightly")],
        description="motionforge: all (or some) stages over every shard of the input videos. "
                    "The cron schedule is an example and is off unless activated.",
        tags=tags, print_next_steps=False, ignore_warnings=True,
    )
    out_list.append(DeployedDeployment(f"{PIPELINE_FLOW}/{PIPELINE_DEPLOYMENT}", str(dep_id), pipeline_pool))

    rerun = prefect_flow.from_source(source=source, entrypoint="flows/pipeline.py:rerun_stage")
    for name, target in ((RERUN_DEPLOYMENT, pool), (RERUN_GPU_DEPLOYMENT, gpu_pool)):
        if not target:
            continue
        dep_id = rerun.deploy(
            name=name, work_pool_name=target, build=False, push=False,
            parameters={"force": False, "config": {"runtime": {"gpu_concurrency_limit": gpu_limit}} if gpu_limit else None},
            description=f"motionforge: re-run one stage for some shards of an output root (on {target}); "
                        "shards empty = all shards; force recomputes complete shards.",
            tags=tags, print_next_steps=False, ignore_warnings=True,
        )
        out_list.append(DeployedDeployment(f"{RERUN_FLOW}/{name}", str(dep_id), target))

    limit_param = {"gpu_limit": gpu_limit} if gpu_limit else {}
    train_flow = prefect_flow.from_source(source=source, entrypoint="flows/train.py:train")
    dep_id = train_flow.deploy(
        name=TRAIN_DEPLOYMENT, work_pool_name=pipeline_pool, build=False, push=False,
        parameters={"resume": True, **limit_param},
        description="motionforge: fine-tune a VLM on iMOVE-IT (LoRA on the language model, vision tower frozen, "
                    "projector trained; or full). config.output_dir is the run folder; a run on an existing "
                    "folder resumes from its last checkpoint.",
        tags=tags, print_next_steps=False, ignore_warnings=True,
    )
    out_list.append(DeployedDeployment(f"{TRAIN_FLOW}/{TRAIN_DEPLOYMENT}", str(dep_id), pipeline_pool))
    eval_flow = prefect_flow.from_source(source=source, entrypoint="flows/train.py:evaluate")
    dep_id = eval_flow.deploy(
        name=EVAL_DEPLOYMENT, work_pool_name=pipeline_pool, build=False, push=False,
        parameters={"benchmark": "imove_it", **limit_param},
        description="motionforge: score a trained checkpoint (imove_it: held-out grounding + captioning metrics; "
                    "charades: Charades-STA-style annotations; motionbench: a video_info.meta.jsonl).",
        tags=tags, print_next_steps=False, ignore_warnings=True,
    )
    out_list.append(DeployedDeployment(f"{EVAL_FLOW}/{EVAL_DEPLOYMENT}", str(dep_id), pipeline_pool))
    return out_list


def worker_commands(cpu_pool: str, gpu_pool: str | None, gpu_limit: str | None, node: str | None = None) -> list[str]:
    cmds = [f"prefect worker start --pool {cpu_pool} --type process"]
    if gpu_pool:
        env = f"{'MOTIONFORGE_GPU_LIMIT=' + gpu_limit + ' ' if node and gpu_limit else ''}"
        cmds.append(f"{env}prefect worker start --pool {gpu_pool} --type process"
                    + (f" --name {node}" if node else ""))
    return cmds
