"""``motionforge export imove-it``: iMOVE-IT samples for VLM trainers, with clip-aligned media.

Wiring only: the formats and the folder layout are in :mod:`stages.export.imove_it`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from flows.cli_groups import export_app


def export_imove_it(out: str, to: str | Path, tasks: list[str] | None = None, formats: list[str] | None = None,
                    workers: int | None = None):
    """Read ``tasks`` from the output root ``out`` and write the export folder ``to``; returns the result."""
    from stages.export.imove_it import FORMATS, StageSamples, export_samples
    from storage.root import OutputRoot

    root = OutputRoot(out)
    if not root.is_local:
        raise ValueError(f"{out}: the iMOVE-IT export cuts clips with ffmpeg and needs a local output root")
    return export_samples(StageSamples(root, tasks), to, formats or FORMATS, workers=workers)


def register(app: typer.Typer) -> None:
    @export_app.command("imove-it")
    def _export(
        out: str = typer.Option(..., "--out", "-o", help="output root of a pipeline run"),
        to: Path = typer.Option(..., "--to", help="export folder (data files + videos/ with the cut clips)"),
        task: list[str] = typer.Option(None, "--task", help="only these tasks (repeatable)"),
        fmt: list[str] = typer.Option(None, "--format", help="internvl | llava | sharegpt (repeatable; default all)"),
        workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                              help="clips cut at once (default: one per core)"),
    ):
        """iMOVE-IT samples for InternVL, LLaVA-NeXT/LLaVA-Video and ShareGPT-style trainers (LLaMA-Factory,
        ms-swift); each clip is cut into the folder so t=0 is the clip start the time tokens refer to."""
        try:
            res = export_imove_it(out, to, task or None, fmt or None, workers)
        except (ValueError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1)
        for name, path in res.files.items():
            typer.echo(f"{name}: {path}")
        typer.echo(f"wrote {res.samples} iMOVE-IT samples over {res.clips} clips to {res.folder}")
        if res.dropped:
            typer.echo(f"{len(res.dropped)} sample(s) left out: their clip could not be cut "
                       f"(reasons in {Path(to) / 'export_errors.json'})", err=True)
