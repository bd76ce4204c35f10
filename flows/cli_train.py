"""Training and checkpoint evaluation commands.

    motionforge train --out ROOT [--name RUN] [--config train.yaml] [--model ID] [--method lora|full]
                      [--data PATH ...] [--mix CHAT.jsonl ...] [--max-steps N] [--nproc N] [--ray-workers N] [--no-resume]
    motionforge eval imove-it --checkpoint DIR [--merge] [--num-frames N] [--limit N]
    motionforge eval charades --checkpoint DIR --annotations charades_sta_test.txt --videos DIR
    motionforge eval export-checkpoint --checkpoint DIR --to DIR     (LoRA merged; then `eval run --model DIR`)

Wiring only: flows in :mod:`flows.train`, logic in :mod:`stages.training`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from flows.cli_groups import eval_app

console = Console(stderr=True)


def _fail(msg: str) -> None:
    console.print(f"[red]{msg}[/]", soft_wrap=True)
    raise typer.Exit(1)


def build_train_config(out: str, name: str, config: Path | None, model: str | None, method: str | None,
                       data: list[str] | None, max_steps: int | None, nproc: int | None,
                       ray_workers: int | None, mix: list[str] | None = None):
    """The run's config: the file's values, then the command-line values; data defaults to the root's
    ``tasks`` table and the run folder to ``<root>/training/<name>``."""
    from flows.config import deep_merge, read_config_file
    from stages.training.config import TrainConfig

    base = read_config_file(config) if config else {}
    over: dict = {"output_dir": base.get("output_dir") or str(Path(out) / "training" / name)}
    if model:
        over["model"] = {"model_id": model}
    if method:
        over["method"] = method
    sources = [{"path": p, "kind": "imove_it"} for p in data or []]
    if not sources and not (base.get("data") or {}).get("sources"):
        sources = [{"path": out, "kind": "imove_it"}]
    if sources or mix:
        if not sources:
            sources = list((base.get("data") or {}).get("sources") or [])
        over["data"] = {"sources": sources + [{"path": p, "kind": "conversations"} for p in mix or []]}
    if max_steps:
        over["optim"] = {"max_steps": max_steps}
    if nproc:
        over["distributed"] = {"nproc_per_node": nproc}
    if ray_workers:
        over.setdefault("distributed", {})["ray_workers"] = ray_workers
    return TrainConfig.model_validate(deep_merge(base, over))


def register(app: typer.Typer) -> None:
    @app.command("train")
    def _train(
        out: str = typer.Option(..., "--out", "-o", help="output root (its tasks table is the default data)"),
        name: str = typer.Option("run", "--name", help="run folder: <out>/training/<name>"),
        config: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON training config (TrainConfig fields)"),
        model: Optional[str] = typer.Option(None, "--model", help="HF id / local path / tiny://qwen2_vl ..."),
        method: Optional[str] = typer.Option(None, "--method", help="lora (default) | full"),
        data: Optional[list[str]] = typer.Option(None, "--data", help="iMOVE-IT: an output root or an `export "
                                                 "imove-it` JSONL (repeatable; default: --out)"),
        mix: Optional[list[str]] = typer.Option(None, "--mix", help="conversation JSONL (LLaVA/ShareGPT) to mix in"),
        max_steps: Optional[int] = typer.Option(None, "--max-steps"),
        nproc: Optional[int] = typer.Option(None, "--nproc", help="processes (GPUs) on this node (torchrun)"),
        ray_workers: Optional[int] = typer.Option(None, "--ray-workers", help="train with Ray Train on N workers"),
        no_resume: bool = typer.Option(False, "--no-resume", help="start over even if checkpoints exist"),
        gpu_limit: Optional[str] = typer.Option(None, "--gpu-limit", help="Prefect GPU concurrency limit to hold"),
    ):
        """Fine-tune a VLM on iMOVE-IT (LoRA, vision tower frozen, projector trained); resumes a killed run."""
        from pydantic import ValidationError

        from flows.train import train

        try:
            cfg = build_train_config(out, name, config, model, method, data, max_steps, nproc, ray_workers, mix)
        except (ValidationError, ValueError) as exc:
            _fail(f"bad training config: {exc}")
        summary = train(config=cfg, resume=not no_resume, gpu_limit=gpu_limit)
        curve = summary["loss_curve"]
        console.print(f"trained {summary['global_step']} steps; loss {curve[0][1]:.4f} -> {curve[-1][1]:.4f}; "
                      f"{summary['samples_per_s'] or 0:.2f} samples/s, {summary['tokens_per_s'] or 0:.0f} tokens/s")
        console.print(f"model: {summary['final']}\nevaluate: motionforge eval imove-it --checkpoint {summary['final']}")

    @eval_app.command("imove-it")
    def _eval_imove(
        checkpoint: Path = typer.Option(..., "--checkpoint", exists=True, file_okay=False,
                                        help="a training run's final/ or checkpoints/checkpoint-N/"),
        out: Optional[str] = typer.Option(None, "--out", help="where predictions.jsonl and metrics.json go"),
        merge: bool = typer.Option(False, "--merge", help="merge the LoRA adapter into the weights first"),
        num_frames: Optional[int] = typer.Option(None, "--num-frames", help="default: the training config's"),
        batch_size: int = typer.Option(8, "--batch-size"),
        limit: Optional[int] = typer.Option(None, "--limit", help="only the first N held-out samples"),
        java: Optional[bool] = typer.Option(None, "--java/--no-java", help="METEOR and the PTB tokenizer need Java "
                                            "(default: when it works)"),
    ):
        """Temporal grounding R@{0.3,0.5,0.7} + mIoU, spatial grounding box IoU + Acc@0.5, captioning metrics on
        the held-out split of the checkpoint's training data."""
        from flows.train import evaluate

        try:
            metrics = evaluate(checkpoint=str(checkpoint), benchmark="imove_it", out=out, merge=merge,
                               num_frames=num_frames, batch_size=batch_size, limit=limit, use_java=java)
        except (ValueError, FileNotFoundError) as exc:
            _fail(str(exc))
        print(json.dumps(metrics, indent=1))

    @eval_app.command("charades")
    def _eval_charades(
        checkpoint: Path = typer.Option(..., "--checkpoint", exists=True, file_okay=False),
        annotations: Path = typer.Option(..., "--annotations", exists=True, dir_okay=False,
                                         help="Charades-STA style: 'VID START END##SENTENCE' per line"),
        videos: Path = typer.Option(..., "--videos", exists=True, file_okay=False, help="folder of VID.mp4"),
        out: Optional[str] = typer.Option(None, "--out"),
        merge: bool = typer.Option(False, "--merge"),
        num_frames: Optional[int] = typer.Option(None, "--num-frames"),
        batch_size: int = typer.Option(8, "--batch-size"),
        limit: Optional[int] = typer.Option(None, "--limit"),
    ):
        """Temporal grounding (R@{0.3,0.5,0.7}, mIoU) on Charades-STA-style queries (iMOVE Table 2)."""
        from flows.train import evaluate

        try:
            metrics = evaluate(checkpoint=str(checkpoint), benchmark="charades", out=out, merge=merge,
                               num_frames=num_frames, annotations=str(annotations), videos=str(videos),
                               batch_size=batch_size, limit=limit)
        except (ValueError, FileNotFoundError) as exc:
            _fail(str(exc))
        print(json.dumps(metrics, indent=1))

    @eval_app.command("export-checkpoint")
    def _export_checkpoint(
        checkpoint: Path = typer.Option(..., "--checkpoint", exists=True, file_okay=False),
        to: Path = typer.Option(..., "--to", help="folder for the merged transformers checkpoint"),
    ):
        """Merge a LoRA checkpoint into a plain transformers model folder (for `eval run --model DIR`, vLLM...)."""
        from stages.training.evaluate import export_merged

        try:
            path = export_merged(checkpoint, to)
        except (ValueError, FileNotFoundError) as exc:
            _fail(str(exc))
        console.print(f"merged model -> {path}\nMotionBench: motionforge eval run --model {path} --meta META --videos DIR")


__all__ = ["register", "build_train_config"]
