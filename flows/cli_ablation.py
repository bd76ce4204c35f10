"""``motionforge ablation``: the MotionBench Tables 7-8 compression grid (see :mod:`flows.ablation`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def ablation(
        out: str = typer.Option(..., "--out", "-o", help="output root; results under ROOT/ablation/NAME/"),
        config: Optional[Path] = typer.Option(None, "--config", "-c", help="JSON file of AblationConfig fields"),
        name: Optional[str] = typer.Option(None, "--name"),
        setting: Optional[str] = typer.Option(None, "--setting", help="fixed_decoder_length | fixed_input_frames"),
        methods: Optional[str] = typer.Option(
            None, "--methods",
            help="comma list of none,pre_encoder,qformer,post_pool,kangaroo,te_fusion (the paper's rows, the default), "
                 "post_mlp"),
        rates: Optional[str] = typer.Option(None, "--rates", help="comma list of k, e.g. 2,4,6,8"),
        train_eval: Optional[str] = typer.Option(None, "--train-eval", help="module:function train-and-evaluate step"),
        step_param: list[str] = typer.Option([], "--step-param", "-p", help="KEY=JSON_VALUE for the step, repeatable"),
        force: bool = typer.Option(False, "--force", help="re-run cells that are already on disk"),
    ):
        """Train and evaluate one configuration per compression method and rate; write the method x rate table."""
        from flows.ablation import AblationConfig, compression_ablation

        fields = json.loads(config.read_text()) if config else {}
        fields["out"] = out
        if name:
            fields["name"] = name
        if setting:
            fields["setting"] = setting
        if methods:
            fields["methods"] = [m.strip() for m in methods.split(",") if m.strip()]
        if rates:
            fields["rates"] = [int(k) for k in rates.split(",") if k.strip()]
        if train_eval:
            fields["train_eval"] = train_eval
        params = dict(fields.get("step_params", {}))
        for item in step_param:
            key, sep, value = item.partition("=")
            if not sep:
                raise typer.BadParameter(f"--step-param wants KEY=VALUE, got {item!r}")
            try:
                params[key] = json.loads(value)
            except json.JSONDecodeError:
                params[key] = value
        fields["step_params"] = params
        if force:
            fields["force"] = True
        paths = compression_ablation(AblationConfig(**fields))
        typer.echo(f"table: {paths['table']}\ncsv: {paths['csv']}")
