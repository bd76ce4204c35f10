"""``motionforge export hf --out ROOT --to DIR``: the run's stage tables as a Hugging Face dataset folder.

Wiring only: the logic is in :mod:`stages.export.hf`.
"""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from flows.cli_groups import export_app

console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    @export_app.command("hf")
    def _export_hf(
        out: str = typer.Option(..., "--out", "-o", help="output root of a pipeline run"),
        to: Path = typer.Option(..., "--to", help="dataset folder to write (new, or an earlier export hf folder)"),
        stage: list[str] = typer.Option(None, "--stage", help="only these stages (repeatable; default: all run)"),
        license_id: str = typer.Option("other", "--license", help="licence id for the dataset card"),
        pretty_name: str = typer.Option("motionforge run", "--name", help="dataset card title"),
        with_test_answers: bool = typer.Option(False, "--with-test-answers",
                                               help="keep finalize's test answers (default: NA, the key stays out)"),
        max_file_mb: float = typer.Option(500.0, "--max-file-mb", min=1.0,
                                          help="start a split's next Parquet file once one holds this many MB"),
    ):
        """Parquet configs per stage + README.md dataset card; `datasets.load_dataset(DIR)` opens it."""
        from stages.export.hf import export_hf
        from storage.root import OutputRoot

        try:
            res = export_hf(OutputRoot(out), to, stages=stage or None, hide_test_answers=not with_test_answers,
                            license_id=license_id, pretty_name=pretty_name,
                            max_file_bytes=int(max_file_mb * 10**6))
        except (ValueError, FileNotFoundError) as exc:
            console.print(f"[red]{exc}[/]", soft_wrap=True)
            raise typer.Exit(1)
        for c in res.configs:
            console.print(f"  {c.name}: " + ", ".join(f"{s} {n}" for s, n in c.splits.items()))
        if res.empty_stages:
            console.print(f"[yellow]no rows (listed in the card, no config): {', '.join(res.empty_stages)}[/]")
        console.print(f"{len(res.configs)} configs (default {res.default}) -> {res.folder}; "
                      f"open with datasets.load_dataset({str(res.folder)!r}, NAME)")


__all__ = ["register"]
