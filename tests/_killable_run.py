"""A real pipeline run that stops (and waits to be SIGKILLed) at a chosen point, for the crash-bookkeeping tests.

    python -m tests._killable_run MODE STOP OUT SIGNAL_DIR

MODE: ``cli`` runs ``motionforge run`` (the flow run is created with its root's tag), ``flow`` calls the pipeline
flow directly (as a deployment run or a Python caller does: the flow tags itself when it starts). STOP:
``before-lock`` blocks in place of taking the root's lock (the run never records itself in the lock);
``holding-lock`` blocks right after the lock is held with this run recorded in it, before any bookkeeping (a kill
during a takeover). The process imports everything, writes ``SIGNAL_DIR/ready``, waits for ``SIGNAL_DIR/go``, runs,
and at the stop point writes its flow run id to ``SIGNAL_DIR/stopped`` and sleeps until killed. Talks to the
Prefect server named by ``PREFECT_API_URL``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path


def main(mode: str, stop: str, out: str, signal_dir: str) -> None:
    from prefect.runtime import flow_run

    import flows.pipeline as pipeline_module
    import storage.lock as lock_module
    from flows.cli import app

    sig = Path(signal_dir)

    def stop_here(*args, **kwargs):
        (sig / "stopped.tmp").write_text(str(flow_run.id))
        (sig / "stopped.tmp").rename(sig / "stopped")
        while True:
            time.sleep(60)

    if stop == "before-lock":
        lock_module.RunLock.acquire = stop_here
    elif stop == "holding-lock":
        pipeline_module._take_root = stop_here
    else:
        raise SystemExit(f"unknown stop point {stop!r}")
    (sig / "ready").write_text("")
    deadline = time.monotonic() + 300
    while not (sig / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit("never told to go")
        time.sleep(0.05)
    # The input is never read: both stop points come before the run plans its inputs.
    if mode == "cli":
        app(["run", "--input", str(sig / "no-input"), "--out", out, "--stages", "ingest", "--profile", "tiny"])
    elif mode == "flow":
        pipeline_module.pipeline(input=str(sig / "no-input"), out=out, stages=["ingest"])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
