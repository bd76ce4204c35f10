"""Cluster operations: ``setup-prefect`` (work pools, GPU limit), ``deploy`` (deployments), ``runs`` (what the
Prefect server says about motionforge runs). Registered into the main CLI by :mod:`flows.cli`."""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True)


def _fail(exc: Exception) -> None:
    console.print(f"[red]{escape(str(exc))}[/]")
    raise typer.Exit(1)


def setup_prefect_cmd(
    gpus: int = typer.Option(..., "--gpus", help="GPUs on the node (slots of the GPU concurrency limit); 0 = CPU only"),
    pool: str = typer.Option("motionforge-cpu", "--pool", help="process work pool for CPU work"),
    gpu_pool: str = typer.Option("motionforge-gpu", "--gpu-pool", help="process work pool for GPU nodes"),
    gpu_limit: str = typer.Option("motionforge-gpu", "--gpu-limit", help="name of the GPU global concurrency limit"),
    node: Optional[str] = typer.Option(None, "--node", help="make a per-node limit GPU_LIMIT-NODE (several GPU nodes)"),
):
    """Create the work pools and the GPU concurrency limit on the Prefect server (idempotent)."""
    from flows.deploy import PrefectSetupError, api_url, setup_prefect, worker_commands

    try:
        res = setup_prefect(gpus, pool, gpu_pool, gpu_limit, node)
    except PrefectSetupError as exc:
        _fail(exc)
    out = Console()
    out.print(f"Prefect server: {api_url()}")
    for name, action in res.pools.items():
        out.print(f"work pool {name!r}: {action}")
    if res.gpu_limit:
        out.print(f"global concurrency limit {res.gpu_limit!r}: {res.gpu_slots} slot(s), {res.limit_action}")
    out.print("start a worker on each node:")
    gp = gpu_pool if gpus > 0 else None
    for cmd in worker_commands(pool, gp, res.gpu_limit, node):
        out.print(f"  {cmd}")
    if res.gpu_limit:
        out.print(f"then: motionforge deploy --pool {pool} --gpu-pool {gpu_pool} --gpu-limit {gpu_limit}")


def deploy_cmd(
    pool: str = typer.Option("motionforge-cpu", "--pool", help="work pool for the rerun-stage deployment (and the pipeline without --gpu-pool)"),
    gpu_pool: Optional[str] = typer.Option(None, "--gpu-pool", help="work pool of the GPU nodes: the pipeline and rerun-stage-gpu go there"),
    gpu_limit: Optional[str] = typer.Option(None, "--gpu-limit", help="GPU concurrency limit GPU stages take slots of (setup-prefect creates it)"),
    profile: str = typer.Option("paper", "--profile", help="paper | small | tiny: the form's default config"),
    config: Optional[str] = typer.Option(None, "--config", help="YAML/JSON overrides baked into the form's defaults"),
    input: Optional[str] = typer.Option(None, "--input", help="default input of the pipeline deployment"),
    out: Optional[str] = typer.Option(None, "--out", help="default output root of the pipeline deployment"),
    cron: str = typer.Option("0 2 * * *", "--cron", help="cron of the pipeline's schedule (inactive unless --schedule-active)"),
    schedule_active: bool = typer.Option(False, "--schedule-active", help="turn the cron schedule on (needs --input/--out)"),
    timezone: str = typer.Option("UTC", "--timezone"),
    source: Optional[str] = typer.Option(None, "--source", help="project directory (same path on every worker) or git URL; default: this checkout"),
):
    """Register the `pipeline`, `rerun-stage`, `train` and `eval` deployments with the Prefect server."""
    from flows.deploy import PrefectSetupError, deploy

    try:
        deps = deploy(pool, gpu_pool, profile=profile, input=input, out=out, gpu_limit=gpu_limit, config_file=config,
                      cron=cron, schedule_active=schedule_active, timezone=timezone, source=source)
    except PrefectSetupError as exc:
        _fail(exc)
    o = Console()
    for d in deps:
        o.print(f"deployment {d.name}  (pool {d.work_pool}, id {d.id})")
    o.print(f"schedule: cron {cron!r} {timezone} ({'active' if schedule_active else 'inactive: turn it on in the UI'})")
    o.print("run it:   prefect deployment run 'motionforge-pipeline/pipeline' -p input=VIDEOS -p out=ROOT")
    o.print("re-run:   prefect deployment run 'motionforge-rerun-stage/rerun-stage' -p out=ROOT -p stage=STAGE "
            "-p 'shards=[K]'")
    o.print("train:    prefect deployment run 'motionforge-train/train' -p 'config={\"output_dir\": \"ROOT/training/RUN\", "
            "\"data\": {\"sources\": [{\"path\": \"ROOT\"}]}}'   (or `motionforge train`)")


def runs_cmd(
    out: Optional[str] = typer.Option(None, "--out", "-o", help="only runs writing this output root"),
    limit: int = typer.Option(20, "--limit", help="latest N flow runs"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Flow runs on the Prefect server (PREFECT_API_URL): state, and which stage shards are running or failed."""
    from flows.server_status import ServerNotConfigured, server_runs

    try:
        data = server_runs(out, limit)
    except ServerNotConfigured as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(data, indent=1))
        return
    print_runs(data, Console())


SHOWN_PER_RUN = 10  # shards listed per flow run in the table, and failure messages printed per run


def _more(n: int) -> str:
    return f" ... and {n} more (--json lists all)" if n > 0 else ""


def print_runs(data: dict, out: Console) -> None:
    """Render :func:`flows.server_status.server_runs` (also usable from ``motionforge status``): per flow run the
    first :data:`SHOWN_PER_RUN` shards not done, and as many failure messages (a bad config can fail every shard
    of a stage, thousands of them)."""
    t = Table(title=f"Prefect flow runs ({data['api_url']})")
    t.add_column("flow run")
    for col in ("flow", "state", "started"):
        t.add_column(col, no_wrap=True)
    t.add_column("stage shards not done")
    for r in data["runs"]:
        runs = r["task_runs"]
        shards = ", ".join(f"{x['stage']} / shard {x['shard']:05d}: {x['state']}" for x in runs[:SHOWN_PER_RUN])
        t.add_row(escape(r["flow_run"]), r["flow"].removeprefix("motionforge-"), r["state"], (r["start_time"] or "")[:19],
                  escape(shards + _more(len(runs) - SHOWN_PER_RUN)) or "-")
    out.print(t)
    for r in data["runs"]:
        failed = [x for x in r["task_runs"] if x["message"] and x["state"] in ("Failed", "Crashed")]
        for x in failed[:SHOWN_PER_RUN]:
            out.print(f"  {escape(r['flow_run'])}: {x['stage']} / shard {x['shard']:05d}: {escape(x['message'])}",
                      soft_wrap=True)
        if len(failed) > SHOWN_PER_RUN:
            out.print(f"  {escape(r['flow_run'])}:{escape(_more(len(failed) - SHOWN_PER_RUN))}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("setup-prefect")(setup_prefect_cmd)
    app.command("deploy")(deploy_cmd)
    app.command("runs")(runs_cmd)
