"""``motionforge export imove-it``: the iMOVE-IT table as conversation JSONL for LLaVA-style trainers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from flows.cli_groups import export_app


def export_imove_it(out: str, to: str | Path, tasks: list[str] | None = None, relative_to: str | None = None) -> int:
    """Write one JSON object per sample: {id, video, conversations, task, clip span, ...}. Returns the count."""
    import pyarrow.compute as pc

    from schemas.imove_it import SCHEMA
    from storage.root import OutputRoot

    table = OutputRoot(out).read_stage("tasks", SCHEMA)
    table = table.filter(pc.equal(table["status"], "ok"))
    if tasks:
        table = table.filter(pc.is_in(table["task"], value_set=__import__("pyarrow").array(tasks)))
    to = Path(to)
    to.parent.mkdir(parents=True, exist_ok=True)
    tmp = to.with_name(f".{to.name}.tmp-{os.getpid()}")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for row in table.to_pylist():
            video = row["video_path"] if relative_to is None else os.path.relpath(row["video_path"], relative_to)
            rec = {
                "id": row["sample_id"],
                "video": video,
                # LLaVA-style trainers cut the clip themselves from these bounds (seconds in the source video)
                "clip_start_s": row["clip_start_s"],
                "clip_end_s": row["clip_end_s"],
                "task": row["task"],
                "conversations": [{"from": t["from"], "value": t["value"]} for t in row["conversations"]],
                "meta": {"instance_id": row["instance_id"], "clip_id": row["clip_id"], "label": row["label"],
                         "t1_token": row["t1_token"], "t2_token": row["t2_token"],
                         "box1_tokens": row["box1_tokens"], "box2_tokens": row["box2_tokens"],
                         "template_id": row["template_id"]},
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, to)
    return n


def register(app: typer.Typer) -> None:
    @export_app.command("imove-it")
    def _export(
        out: str = typer.Option(..., "--out", "-o", help="output root of a pipeline run"),
        to: Path = typer.Option(..., "--to", help="JSONL file to write"),
        task: list[str] = typer.Option(None, "--task", help="only these tasks (repeatable)"),
        relative_to: str = typer.Option(None, "--relative-to", help="write video paths relative to this folder"),
    ):
        """iMOVE-IT samples as LLaVA-style conversation JSONL."""
        n = export_imove_it(out, to, task or None, relative_to)
        typer.echo(f"wrote {n} iMOVE-IT samples to {to}")
