"""The compression ablation's train-and-evaluate step on the training flow (issue 17): one grid cell =
one ``stages.training`` run with the cell's temporal fusion plugged in by config, scored on MotionBench.

Use it as ``motionforge ablation --train-eval flows.ablation_training:trainer_step -p data=ROOT_OR_JSONL
-p motionbench_meta=dev.meta.jsonl -p motionbench_videos=DIR ...``. Parameters (``cell.params``):

* ``data`` (required): an iMOVE-IT output root or ``export imove-it`` JSONL (``data_kind``: ``imove_it``,
  or ``conversations`` for a LLaVA-style JSONL); ``motionbench_meta`` (required), ``motionbench_videos``,
  ``motionbench_answers`` (an answer key, when the meta has none), ``limit`` (first N questions);
* ``model_id`` (tiny://qwen2_vl), ``method`` (lora | full), ``lora_r`` (16), ``steps`` (20), ``lr`` (2e-4),
  ``batch_size`` (2), ``short_side`` (224), ``seed`` (0), ``position_tokens`` (numbers | tokens);
* ``runs_dir``: where each cell's run folder (``<runs_dir>/<method>-k<k>``: checkpoints, final weights,
  MotionBench responses) is kept; without it the run lives in a temporary folder removed after scoring.

Frames: ``cell.input_slots`` Qwen2-VL time slots of 2 frames each, in training and in evaluation.
Returns MotionBench accuracy (``accuracy``), per-category accuracies, the number of questions whose clip or
answer failed (``errors``, scored as wrong), the last training loss, and the cell's speed: ``train_samples_per_s``
(the Trainer's samples over the wall time of ``trainer.train``, data loading and the collator included),
``eval_samples_per_s`` (questions answered over the wall time of the MotionBench evaluation, clip decoding and
generation included) and, on CUDA, ``peak_gpu_mib`` (the most memory torch held over training, the checkpoint's
reload and evaluation). Video tokens per sample are not reported here: they follow each clip's own frame size.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from flows.ablation import AblationCell

FRAMES_PER_SLOT = 2  # Qwen2-VL's temporal_patch_size

DEFAULTS: dict[str, Any] = {"model_id": "tiny://qwen2_vl", "data_kind": "imove_it", "method": "lora", "lora_r": 16,
                            "steps": 20, "lr": 2e-4, "batch_size": 2, "short_side": 224, "seed": 0,
                            "position_tokens": "numbers", "motionbench_videos": None, "motionbench_answers": None,
                            "limit": None, "runs_dir": None}


def cell_train_config(cell: AblationCell, output_dir: str | Path):
    """The training config of one cell: the step's parameters, the cell's fusion as a model part."""
    from stages.training.config import (DataConfig, DataSource, LoraConfig, ModelConfig, ModelPart, OptimConfig,
                                        TrainConfig)

    p = {**DEFAULTS, **cell.params}
    if not p.get("data"):
        raise ValueError("trainer_step needs -p data=<iMOVE-IT root or export JSONL>")
    parts = ModelPart(target="stages.training.parts:papers_model_parts",
                      # fields left at their defaults (the QFormer's size) stay out of the run's config and fingerprint
                      kwargs={"temporal_fusion": cell.fusion.model_dump(mode="json", exclude_defaults=True),
                              "position_tokens": {"mode": p["position_tokens"]}})
    r = int(p["lora_r"])
    return TrainConfig(
        output_dir=str(output_dir), model=ModelConfig(model_id=str(p["model_id"])), method=p["method"],
        data=DataConfig(sources=(DataSource(kind=p["data_kind"], path=str(p["data"])),), eval_fraction=0.0,
                        num_frames=cell.input_slots * FRAMES_PER_SLOT, short_side=int(p["short_side"])),
        lora=LoraConfig(r=r, alpha=2 * r, dropout=0.0),
        optim=OptimConfig(learning_rate=float(p["lr"]), per_device_batch_size=int(p["batch_size"]),
                          max_steps=int(p["steps"]), seed=int(p["seed"])),
        model_parts=(parts,), save_steps=max(int(p["steps"]), 1), dataloader_num_workers=0, report_to=())


def trainer_step(cell: AblationCell) -> dict[str, float]:
    """Train the cell's configuration with the training flow's Trainer, score it on MotionBench."""
    from experts.vlm import VlmSpec, vlm_from_loaded
    from stages.training import evaluate as ev
    from stages.training.trainer import run_training

    import torch

    p = {**DEFAULTS, **cell.params}
    if not p.get("motionbench_meta"):
        raise ValueError("trainer_step needs -p motionbench_meta=<video_info.meta.jsonl> to score the cell")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix=f"ablation-{cell.key}-") as tmp:
        run_dir = Path(p["runs_dir"]) / cell.key if p["runs_dir"] else Path(tmp) / cell.key
        cfg = cell_train_config(cell, run_dir)
        summary = run_training(cfg)
        model, processor, cfg = ev.load_checkpoint(summary["final"], merge=cfg.method == "lora")
        vlm = vlm_from_loaded(model, processor, VlmSpec(model_id=cfg.model.model_id, max_new_tokens=16,
                                                        batch_size=int(p["batch_size"])), name=str(run_dir))
        t0 = time.perf_counter()
        result = ev.evaluate_motionbench(vlm, p["motionbench_meta"], p["motionbench_videos"], cfg.data.num_frames,
                                         cfg.data.short_side, run_dir / "eval_motionbench",
                                         answers=p["motionbench_answers"], batch_size=int(p["batch_size"]),
                                         limit=p["limit"])
        eval_s = time.perf_counter() - t0  # generation returns text, so the GPU has finished by then
    if result.get("overall") is None:
        raise ValueError(f"no MotionBench question was scored for {cell.key} (errors: {result.get('errors')})")
    errors = len(result.get("errors") or {})
    out = {"accuracy": float(result["overall"]), "errors": float(errors)}
    out.update({cat: float(acc) for cat, acc in result.get("per_category", {}).items() if acc is not None})
    if summary["loss_curve"]:
        out["train_loss"] = float(summary["loss_curve"][-1][1])
    if summary.get("samples_per_s"):
        out["train_samples_per_s"] = float(summary["samples_per_s"])
    answered = int(result["scored"]) + int(result["not_scored"]) - errors
    if answered > 0:
        out["eval_samples_per_s"] = answered / max(eval_s, 1e-9)
    if cuda:
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out
