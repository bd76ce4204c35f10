"""What a Prefect server knows about motionforge runs: flow runs by state, and the (stage, shard) task runs
that are running, retrying or failed. Complements :func:`dashboards.status.root_status`, which reads the
output root and works offline."""
from __future__ import annotations

import re
from typing import Any

FLOW_NAMES = ("motionforge-pipeline", "motionforge-rerun-stage", "motionforge-stages")
_TASK_NAME = re.compile(r"^(?P<stage>[\w.-]+) / shard (?P<shard>\d+)$")
# Task states worth showing: the rest (completed, scheduled) are what the root status already says.
SHOWN_TASK_STATES = ("RUNNING", "FAILED", "CRASHED", "PENDING", "CANCELLED", "CANCELLING")


class ServerNotConfigured(RuntimeError):
    pass


def server_configured() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def parse_task_run_name(name: str) -> tuple[str, int] | None:
    m = _TASK_NAME.match(name or "")
    return (m["stage"], int(m["shard"])) if m else None


def server_runs(out: str | None = None, limit: int = 20) -> dict[str, Any]:
    """The latest ``limit`` motionforge flow runs (optionally only those writing ``out``) with their state and
    the (stage, shard) task runs that are not simply done: running, retrying (AwaitingRetry is a SCHEDULED
    state named "AwaitingRetry"), failed or crashed."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter, FlowFilterName, TaskRunFilter, TaskRunFilterFlowRunId)
    from prefect.client.schemas.sorting import FlowRunSort

    url = server_configured()
    if not url:
        raise ServerNotConfigured("PREFECT_API_URL is not set; point it at your Prefect server "
                                  "(export PREFECT_API_URL=http://HOST:4200/api) to see its flow runs")
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows(flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOW_NAMES))))}
        if not flows:
            return {"api_url": url, "runs": []}
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOW_NAMES))),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit * 3 if out else limit)
        if out:
            norm = str(out).rstrip("/")
            runs = [r for r in runs if str((r.parameters or {}).get("out", "")).rstrip("/") == norm][:limit]
        by_run: dict[Any, list[dict]] = {r.id: [] for r in runs}
        if runs:
            task_runs = client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[r.id for r in runs])),
                limit=200)
            for t in task_runs:
                parsed = parse_task_run_name(t.name)
                if parsed is None or t.state is None:
                    continue
                if t.state.type.value not in SHOWN_TASK_STATES and t.state.name != "AwaitingRetry":
                    continue
                by_run.setdefault(t.flow_run_id, []).append({
                    "stage": parsed[0], "shard": parsed[1], "state": t.state.name,
                    "message": (t.state.message or "")[:300]})
    out_runs = []
    for r in runs:
        shards = sorted(by_run.get(r.id, []), key=lambda d: (d["stage"], d["shard"]))
        out_runs.append({
            "flow": flows.get(r.flow_id, "?"), "flow_run": r.name, "id": str(r.id),
            "state": r.state.name if r.state else "?", "state_type": r.state.type.value if r.state else "?",
            "start_time": r.start_time.isoformat() if r.start_time else None,
            "out": (r.parameters or {}).get("out"), "stage": (r.parameters or {}).get("stage"),
            "task_runs": shards,
        })
    return {"api_url": url, "runs": out_runs}
