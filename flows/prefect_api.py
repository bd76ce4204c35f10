"""The Prefect API a CLI run talks to: the configured server, or a temporary local one started up front.

With no ``PREFECT_API_URL``, Prefect starts a temporary server in a subprocess the first time a client is needed
and gives up after ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (20 s by default). On a busy machine
that start can take longer, and the run then dies before doing anything. :func:`ensure_prefect_api` starts that
server before the flow is called, with a longer timeout and a retry; the flow's clients then find it running.
"""
from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("motionforge.flows")

MIN_STARTUP_TIMEOUT_S = 60
TIMEOUT_MARKER = "Timed out while attempting to connect to ephemeral Prefect API server"


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
