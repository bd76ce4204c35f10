"""``motionforge report``: the dataset statistics page."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def report(out: str = typer.Option(..., "--out", "-o"),
               to: Optional[Path] = typer.Option(None, "--to", help="HTML file (default ROOT/_report/index.html)")):
        """Write a static HTML report: per-stage counts, drop reasons, distributions."""
        from dashboards.report import write_report

        path = write_report(out, to)
        typer.echo(f"report: {path}")
