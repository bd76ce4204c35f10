"""A real Prefect server and process workers for the ops tests, started as subprocesses and stopped by PID."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_WORKER_QUERY_SECONDS": "1",
                "PREFECT_WORKER_PREFETCH_SECONDS": "1", "PREFECT_UI_ENABLED": "false"})
    if api_url:
        env["PREFECT_API_URL"] = api_url
    else:
        env.pop("PREFECT_API_URL", None)
    return env


def eventually(read, done, timeout_s: float = 60.0, every_s: float = 0.25):
    """``read()`` until ``done(value)`` holds, then return that value; after ``timeout_s`` return the last one
    (the caller's assert then shows it). Task runs and their states reach the API through the server's task-run
    recorder, which writes them in batches up to a second after the client sent them (flows.prefect_api);
    a generous timeout because a loaded machine delays that flush."""
    end = time.monotonic() + timeout_s
    value = read()
    while not done(value) and time.monotonic() < end:
        time.sleep(every_s)
        value = read()
    return value


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group started for ``proc`` (its own session), then SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def start_server(home: Path, log: Path, timeout_s: float = 180.0) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=prefect_env(home), stdout=log.open("wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, api
        except OSError:
            pass
        time.sleep(0.5)
    stop(proc)
    raise RuntimeError(f"prefect server did not answer {api}/health within {timeout_s}s:\n{log.read_text()[-3000:]}")


def start_worker(pool: str, home: Path, api_url: str, log: Path, extra_env: dict | None = None) -> subprocess.Popen:
    env = prefect_env(home, api_url)
    env.update(extra_env or {})
    return subprocess.Popen([str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"],
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
                            cwd=str(Path(__file__).resolve().parent.parent))


def drain_prefect_workers() -> None:
    """Flush and stop this process's Prefect log and event workers.

    They are process-wide singletons holding a client for the API URL they started with; left running after
    their server stops, the next server's harness waits forever on them at its own shutdown.
    """
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain():
        with contextlib.suppress(RuntimeError):  # the log worker may never have started
            result = APILogWorker.instance().drain()
            if inspect.isawaitable(result):
                await result
        result = EventsWorker.drain_all()
        if inspect.isawaitable(result):
            await result

    run_coro_as_sync(drain())
