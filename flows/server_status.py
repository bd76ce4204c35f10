"""What a Prefect server knows about motionforge runs: flow runs by state, and the (stage, shard) task runs
that are running, retrying or failed. Complements :func:`dashboards.status.root_status`, which reads the
output root and works offline."""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any

from storage.root import normalise_root_url

# Every flow run working on an output root carries this tag plus a digest of the root's resolved URL (see
# :func:`root_tag`): the run holding the root's lock finds the runs that died on it by it
# (``flows.pipeline.mark_root_runs_crashed``), and :func:`server_runs` a root's runs.
ROOT_TAG_PREFIX = "motionforge-root:"
FLOW_NAMES = ("motionforge-pipeline", "motionforge-rerun-stage", "motionforge-stages")
_TASK_NAME = re.compile(r"^(?P<stage>[\w.-]+) / shard (?P<shard>\d+)$")
# A task run of several shards (runtime.shards_per_task): "scenes / shards 00008-00015" or "... 00001,00004"
_GROUP_NAME = re.compile(r"^(?P<stage>[\w.-]+) / shards (?P<label>\d+(?:-\d+|(?:,\d+)*))$")
_FAILED_SHARD = re.compile(r"shard (\d{5,}): ")  # how flows.pipeline.ShardsFailed names a failed shard
# Task states worth showing: the rest (completed, scheduled) are what the root status already says.
SHOWN_TASK_STATES = ("RUNNING", "FAILED", "CRASHED", "PENDING", "CANCELLED", "CANCELLING")


class ServerNotConfigured(RuntimeError):
    pass


def server_configured() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def root_tag(out: str) -> str:
    """The tag of every flow run (and its stage-graph subflow run) working on the output root ``out``:
    a digest of the root's URL as :class:`storage.root.OutputRoot` normalises it, with symlinks resolved for a
    local path, so every spelling of one root gives one tag and two roots never share one."""
    url = normalise_root_url(out)
    if "://" not in url:
        url = os.path.realpath(url)
    return ROOT_TAG_PREFIX + hashlib.sha256(url.encode()).hexdigest()[:16]


def parse_task_run_name(name: str) -> tuple[str, int] | None:
    m = _TASK_NAME.match(name or "")
    return (m["stage"], int(m["shard"])) if m else None


def task_run_shards(name: str, state_name: str = "", message: str = "") -> tuple[str, list[int]] | None:
    """The stage and shards of a (stage, shard) task run, or of a task run of several shards; of a failed one
    of several, only the shards its message names as failed (the others were written)."""
    one = parse_task_run_name(name)
    if one is not None:
        return one[0], [one[1]]
    m = _GROUP_NAME.match(name or "")
    if m is None:
        return None
    label = m["label"]
    if "-" in label:
        a, b = (int(x) for x in label.split("-"))
        shards = list(range(a, b + 1))
    else:
        shards = [int(x) for x in label.split(",")]
    if state_name == "Failed":
        named = {int(x) for x in _FAILED_SHARD.findall(message or "")} & set(shards)
        shards = sorted(named) or shards
    return m["stage"], shards


def server_runs(out: str | None = None, limit: int = 20) -> dict[str, Any]:
    """The latest ``limit`` motionforge flow runs (optionally only those on the root ``out``) with their state and
    the (stage, shard) task runs that are not simply done: running, retrying (AwaitingRetry is a SCHEDULED
    state named "AwaitingRetry"), failed or crashed."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterTags, TaskRunFilter, TaskRunFilterFlowRunId,
        TaskRunFilterState, TaskRunFilterStateName, TaskRunFilterStateType)
    from prefect.client.schemas.sorting import FlowRunSort

    from flows.prefect_api import read_all

    url = server_configured()
    if not url:
        raise ServerNotConfigured("PREFECT_API_URL is not set; point it at your Prefect server "
                                  "(export PREFECT_API_URL=http://HOST:4200/api) to see its flow runs")
    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows(flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOW_NAMES))))}
        if not flows:
            return {"api_url": url, "runs": []}
        # A root's runs by its tag, on the server: every spelling of the root finds them, however many runs on
        # other roots came since. ``limit`` may exceed the server's page (200), so pages are read up to it.
        runs = read_all(client.read_flow_runs, most=limit,
                        flow_filter=FlowFilter(name=FlowFilterName(any_=list(FLOW_NAMES))),
                        flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[root_tag(out)])) if out else None,
                        sort=FlowRunSort.EXPECTED_START_TIME_DESC)
        by_run: dict[Any, list[dict]] = {r.id: [] for r in runs}
        if runs:
            # The server picks the shown ones, and every page of them is read: a big run's finished task runs
            # are tens of thousands, and a shard that failed early is anywhere among them.
            task_runs = read_all(client.read_task_runs, task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=[r.id for r in runs]),
                state=TaskRunFilterState(operator="or_", type=TaskRunFilterStateType(any_=list(SHOWN_TASK_STATES)),
                                         name=TaskRunFilterStateName(any_=["AwaitingRetry"]))))
            for t in task_runs:
                parsed = task_run_shards(t.name, t.state.name, t.state.message) if t.state is not None else None
                if parsed is None:
                    continue
                by_run.setdefault(t.flow_run_id, []).extend({
                    "stage": parsed[0], "shard": k, "state": t.state.name,
                    "message": (t.state.message or "")[:300]} for k in parsed[1])
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
