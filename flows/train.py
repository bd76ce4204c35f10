"""Prefect flows downstream of the data: ``motionforge-train`` (fine-tune a VLM on iMOVE-IT) and
``motionforge-eval`` (score a trained checkpoint on the iMOVE-IT held-out split or Charades-STA queries).

Wiring only: the training logic is in :mod:`stages.training`, the metrics in :mod:`stages.evaluation.imove_it`.
Like the pipeline's GPU stages, a run holds slots of the Prefect global concurrency limit (one per GPU it
uses: ``distributed.nproc_per_node``, or ``distributed.ray_workers`` with Ray) for as long as it trains, so
training and GPU stages on one node never oversubscribe its GPUs. Several processes are started with
``torchrun`` (DDP, or FSDP / DeepSpeed per config) on the worker's node; several nodes with Ray Train.
Each run publishes a markdown artifact (throughput, fingerprints, where things are) and a table artifact
with the loss curve; TensorBoard logs are in the run folder.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

from flows.prefect_api import apply_server_defaults  # noqa: E402

apply_server_defaults()  # before the temporary Prefect server starts

from prefect import flow  # noqa: E402

from flows.pipeline import _logger, gpu_slots  # noqa: E402
from stages.training.config import TrainConfig  # noqa: E402

TRAIN_FLOW = "motionforge-train"
EVAL_FLOW = "motionforge-eval"


def gpus_needed(cfg: TrainConfig) -> int:
    d = cfg.distributed
    return d.ray_workers if d.ray_workers > 0 else d.nproc_per_node


def _run_launcher(cfg: TrainConfig, resume: bool) -> dict:
    from stages.training.trainer import launch_command

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "launch_config.json"
    cfg_path.write_text(cfg.model_dump_json(indent=1), encoding="utf-8")
    cmd = launch_command(cfg_path, cfg.distributed.nproc_per_node) + ([] if resume else ["--no-resume"])
    log_path = out / "launcher.log"
    with open(log_path, "a", encoding="utf-8") as log_file:
        rc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"torchrun exited with {rc}; its output is in {log_path}. Run the flow again to resume "
                           "from the last checkpoint")
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def publish_train_artifacts(summary: dict) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    curve = summary.get("loss_curve") or []
    create_table_artifact(key="train-loss-curve", table=[{"step": s, "loss": round(l, 6)} for s, l in curve],
                          description=f"training loss per step: {summary['output_dir']}")
    first = curve[0][1] if curve else None
    last = curve[-1][1] if curve else None

    def fmt(v: Any, spec: str = ".4g") -> str:
        return "-" if v is None else format(v, spec)

    md = "\n".join([
        f"# Training run `{summary['output_dir']}`", "",
        "| | |", "|---|---|",
        f"| steps | {summary['global_step']} ({summary['steps_this_run']} in this run"
        + (f", resumed from `{summary['resumed_from']}`" if summary.get("resumed_from") else "") + ") |",
        f"| loss first / last | {fmt(first)} / {fmt(last)} |",
        f"| samples/s | {fmt(summary.get('samples_per_s'))} |",
        f"| tokens/s | {fmt(summary.get('tokens_per_s'))} |",
        f"| processes x batch | {summary['world_size']} (global batch {summary['global_batch_size']}) |",
        f"| config / data fingerprint | `{summary['config_fingerprint']}` / `{summary['data_fingerprint']}` |",
        f"| model | `{summary['final']}` |", "",
        f"TensorBoard: `tensorboard --logdir {summary['output_dir']}/tensorboard`",
    ])
    create_markdown_artifact(key="train-summary", markdown=md, description="motionforge training run")


@flow(name=TRAIN_FLOW, flow_run_name="train -> {config.output_dir}", log_prints=True)
def train(config: TrainConfig, resume: bool = True, gpu_limit: Optional[str] = None) -> dict:
    """Fine-tune a VLM per ``config`` (iMOVE B.1 by default); a run on an existing folder resumes from its last
    checkpoint."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.model_validate(config)
    logger = _logger()
    with gpu_slots(gpus_needed(cfg), gpu_limit, f"training run {cfg.output_dir}"):
        if cfg.distributed.ray_workers > 0:
            from stages.training.ray_train import run_with_ray

            summary = run_with_ray(cfg, resume=resume)
        elif cfg.distributed.nproc_per_node > 1 or cfg.distributed.strategy in ("fsdp", "deepspeed"):
            summary = _run_launcher(cfg, resume)
        else:
            from stages.training.trainer import run_training

            summary = run_training(cfg, resume=resume)
    logger.info("trained %d steps -> %s (%.1f samples/s)", summary["global_step"], summary["final"],
                summary.get("samples_per_s") or 0.0)
    with contextlib.suppress(Exception):  # artifacts need a flow run context; a direct .fn() call has none
        publish_train_artifacts(summary)
    return summary


@flow(name=EVAL_FLOW, flow_run_name="eval {benchmark} <- {checkpoint}", log_prints=True)
def evaluate(checkpoint: str, benchmark: str = "imove_it", out: Optional[str] = None, merge: bool = False,
             num_frames: Optional[int] = None, short_side: Optional[int] = None, annotations: Optional[str] = None,
             videos: Optional[str] = None, answers: Optional[str] = None, batch_size: int = 8,
             limit: Optional[int] = None, use_java: Optional[bool] = None, gpu_limit: Optional[str] = None) -> dict:
    """Score a trained checkpoint: ``imove_it`` (held-out split of its training data: grounding and
    captioning metrics), ``charades`` (``annotations`` in Charades-STA format, ``videos`` folder) or
    ``motionbench`` (``annotations`` = video_info.meta.jsonl, ``videos``, optional ``answers`` key).
    ``use_java``: METEOR (a jar) and Stanford's tokenizer; None = when a Java runtime works."""
    from experts.vlm import VlmSpec, vlm_from_loaded
    from stages.training import evaluate as ev

    if benchmark not in ("imove_it", "charades", "motionbench"):
        raise ValueError(f"benchmark must be imove_it, charades or motionbench, got {benchmark!r}")
    if benchmark != "imove_it" and not (annotations and videos):
        raise ValueError(f"{benchmark} needs annotations (the annotation / meta file) and videos (their folder)")
    out_dir = out or str(Path(checkpoint) / f"eval_{benchmark}")
    with gpu_slots(1, gpu_limit, f"evaluation of {checkpoint}"):
        model, processor, cfg = ev.load_checkpoint(checkpoint, merge=merge)
        n = num_frames or cfg.data.num_frames
        side = short_side if short_side is not None else cfg.data.short_side
        vlm = vlm_from_loaded(model, processor, VlmSpec(model_id=cfg.model.model_id, batch_size=batch_size),
                              name=str(checkpoint))
        if benchmark == "imove_it":
            samples = ev.held_out_samples(cfg)[:limit]
            metrics = ev.evaluate_imove_it(vlm, samples, n, side, out_dir, batch_size=batch_size, use_java=use_java)
        elif benchmark == "motionbench":
            metrics = ev.evaluate_motionbench(vlm, annotations, videos, n, side, out_dir, answers=answers,
                                              batch_size=batch_size, limit=limit)
        else:
            from stages.evaluation.imove_it import read_charades_sta

            queries = read_charades_sta(annotations)[:limit]
            metrics = ev.evaluate_charades(vlm, queries, videos, n, side, out_dir, batch_size=batch_size)
    with contextlib.suppress(Exception):
        publish_eval_artifact(metrics, checkpoint, benchmark, out_dir)
    return metrics


def metric_rows(metrics: dict) -> list[dict]:
    rows = []
    if "per_category" in metrics:  # MotionBench
        rows += [{"task": "motionbench", "metric": name, "value": None if acc is None else round(acc, 4)}
                 for name, acc in {**metrics["per_category"], "overall": metrics.get("overall")}.items()]
        return rows
    for task, vals in metrics.items():
        if not isinstance(vals, dict) or task == "errors":
            continue
        for k, v in vals.items():
            if isinstance(v, (int, float)):
                rows.append({"task": task, "metric": k, "value": round(float(v), 4)})
            elif k == "unparseable":
                rows.append({"task": task, "metric": "unparseable", "value": len(v)})
    return rows


def publish_eval_artifact(metrics: dict, checkpoint: str, benchmark: str, out_dir: str) -> None:
    from prefect.artifacts import create_table_artifact

    create_table_artifact(key=f"eval-{benchmark.replace('_', '-')}", table=metric_rows(metrics),
                          description=f"{benchmark} metrics of {checkpoint}; predictions in {out_dir}")
