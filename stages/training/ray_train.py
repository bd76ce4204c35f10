"""Several nodes: the same training run under Ray Train's ``TorchTrainer``.

Ray starts ``distributed.ray_workers`` worker processes (one GPU each with ``ray_use_gpu``) across the cluster,
creates the torch process group and sets the launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, ...), so every
worker runs the unchanged :func:`stages.training.trainer.run_training` and transformers' Trainer does DDP /
FSDP / DeepSpeed over it exactly as under torchrun. The run folder (checkpoints, TensorBoard, summary) and the
data must be on storage that every node sees; resuming works as in a single-node run.
"""
from __future__ import annotations

import json
from pathlib import Path

from stages.training.config import TrainConfig


def _worker_loop(config: dict) -> None:
    from stages.training.trainer import run_training

    run_training(TrainConfig.model_validate(config["train_config"]), resume=config["resume"])


def run_with_ray(cfg: TrainConfig, resume: bool = True) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.distributed
    if d.ray_workers < 1:
        raise ValueError("distributed.ray_workers must be >= 1 to train with Ray")
    if not ray.is_initialized():
        ray.init(address=d.ray_address, include_dashboard=False)
    out = Path(cfg.output_dir)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train_config": cfg.model_dump(mode="json"), "resume": resume},
        scaling_config=ScalingConfig(num_workers=d.ray_workers, use_gpu=d.ray_use_gpu),
        torch_config=TorchConfig(backend="nccl" if d.ray_use_gpu else "gloo"),
        run_config=RunConfig(name="ray", storage_path=str((out / "ray").resolve())),
    )
    trainer.fit()
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))
