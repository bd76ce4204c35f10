"""The Prefect API a CLI run talks to: the configured server, or a temporary local one started up front.

With no ``PREFECT_API_URL``, Prefect starts a temporary server in a subprocess the first time a client is needed
and gives up after ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (20 s by default). On a busy machine
that start can take longer, and the run then dies before doing anything. :func:`ensure_prefect_api` starts that
server before the flow is called, with a longer timeout and a retry; the flow's clients then find it running.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

log = logging.getLogger("motionforge.flows")

MIN_STARTUP_TIMEOUT_S = 60
TIMEOUT_MARKER = "Timed out while attempting to connect to ephemeral Prefect API server"

# Settings for a Prefect server this process starts: the temporary one, which Prefect hands this process's
# environment. A setting the user gave (environment or active Prefect profile) is left as it is, and a
# `prefect server start` elsewhere takes them from its own environment (docs/cluster.md).
# * No usage analytics from our runs.
# * The task-run recorder writes task runs and their states in batches of up to 100 events, or after at most
#   1 s (Prefect's defaults: every event on its own, else every 5 s). One by one it compiles and commits an
#   INSERT per event, three events per task run (Pending, Running, Completed). A task run's state then reaches
#   the API up to a second later; 1 s is the shortest interval the recorder takes (it sleeps int(seconds)).
# * uvicorn (the temporary server runs `python -m uvicorn`, whose options also read UVICORN_* variables) does not
#   offer per-message deflate on websockets: the flow process streams every event (three per task run) to the
#   server over one, and over loopback compressing each message is CPU spent on both ends for nothing.
# Together: the server's CPU per (stage, shard) task 37 -> 15 ms on 2 cores (docs/cluster.md, "What Prefect
# costs per task"; benchmarks/bench_orchestration.py).
UVICORN_DEFAULTS = {"UVICORN_WS_PER_MESSAGE_DEFLATE": "false"}
SERVER_DEFAULTS = {  # environment variable -> (settings path under Settings.server, value)
    "PREFECT_SERVER_ANALYTICS_ENABLED": (("analytics_enabled",), "false"),
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": (("services", "task_run_recorder", "batch_size"), "100"),
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": (
        ("services", "task_run_recorder", "flush_interval"), "1"),
}


def apply_server_defaults() -> None:
    """Put :data:`UVICORN_DEFAULTS` and :data:`SERVER_DEFAULTS` into the environment unless the user set them:
    in the environment, or, for Prefect's settings, in the active Prefect profile (a value there is "set" in
    Prefect's settings; putting ours in the environment would override it, as Prefect ranks the environment
    above profiles)."""
    from prefect.settings import get_current_settings

    for key, value in UVICORN_DEFAULTS.items():
        os.environ.setdefault(key, value)
    server = get_current_settings().server
    for key, (path, value) in SERVER_DEFAULTS.items():
        if key in os.environ:
            continue
        model = server
        for name in path[:-1]:
            model = getattr(model, name)
        if path[-1] not in model.model_fields_set:
            os.environ[key] = value


class PrefectApiUnavailable(RuntimeError):
    pass


def _default_server():
    from prefect.server.api.server import SubprocessASGIServer

    return SubprocessASGIServer()


def advice(tried: list[int]) -> str:
    return (
        f"the temporary Prefect server did not start within {' s, then '.join(map(str, tried))} s (a busy machine "
        "starts it slowly). Start a server once in another terminal: `prefect server start`, then "
        "`export PREFECT_API_URL=http://127.0.0.1:4200/api` and run again (or raise "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
    )


def ensure_prefect_api(attempts: int = 2, server_factory: Callable[[], object] | None = None) -> str | None:
    """Return the API URL in use. With none configured, start the temporary server now: first with
    ``max(setting, 60 s)``, then twice that; on the last failure raise :class:`PrefectApiUnavailable`."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    if PREFECT_API_URL.value():
        return PREFECT_API_URL.value()
    if not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return None  # Prefect raises its own clear error in this case
    apply_server_defaults()  # whichever module imported Prefect first, the server we start gets them
    factory = server_factory or _default_server
    timeout = max(int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() or 0), MIN_STARTUP_TIMEOUT_S)
    tried: list[int] = []
    last: Exception | None = None
    for _ in range(max(1, attempts)):
        server = factory()
        tried.append(timeout)
        try:
            server.start(timeout=timeout)
            return getattr(server, "api_url", None)
        except RuntimeError as exc:
            if TIMEOUT_MARKER not in str(exc):
                raise
            last = exc
            log.warning("temporary Prefect server not up after %d s; retrying with %d s", timeout, timeout * 2)
            server.stop()  # the half-started process goes, and the next factory() call makes a fresh server
            timeout *= 2
    raise PrefectApiUnavailable(advice(tried)) from last


def read_all(read: Callable[..., list], most: int | None = None, **query) -> list:
    """Every row a client ``read_*`` call (``read_task_runs``, ``read_flow_runs``) matches, page by page, or the
    first ``most`` of them.

    One read without a limit gets only the server's first page, ``PREFECT_SERVER_API_DEFAULT_LIMIT`` rows (200 by
    default, and the most the server accepts), newest id first; one stage-graph run at scale has tens of
    thousands of task runs. The page size is whatever the server gave for the first page; a row that moves a
    page down while this reads (a newer row appeared) is kept once."""
    rows, seen, offset, full = [], set(), 0, None
    while True:
        got = read(offset=offset, **query)
        rows += [r for r in got if r.id not in seen]
        seen.update(r.id for r in got)
        full = len(got) if full is None else full
        if most is not None and len(rows) >= most:
            return rows[:most]
        if not got or len(got) < full:
            return rows
        offset += len(got)
