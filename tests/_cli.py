"""Invoke the motionforge CLI in-process (so it talks to the session's Prefect test server)."""
from __future__ import annotations

from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def invoke(*args: str):
    res = runner.invoke(app, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res
