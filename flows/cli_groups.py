"""Shared command groups, so that command modules (cli_imove, cli_motionbench, ...) can add to the same
``motionforge export ...`` / ``review`` / ``eval`` / ``import`` groups without importing each other."""
from __future__ import annotations

import typer

export_app = typer.Typer(no_args_is_help=True, help="Write training and benchmark exports.")
review_app = typer.Typer(no_args_is_help=True, help="Human review queue (MotionBench 9.4).")
eval_app = typer.Typer(no_args_is_help=True, help="Evaluate models on the produced data.")
import_app = typer.Typer(no_args_is_help=True, help="Import human annotations.")

GROUPS = {"export": export_app, "review": review_app, "eval": eval_app, "import": import_app}
