"""Trainer set-up and one training run: transformers' ``Trainer``, resumable, fingerprinted, logged.

Layout of a run folder (``TrainConfig.output_dir``)::

    config.json                     the config this run was started with
    checkpoints/checkpoint-<step>/  Trainer checkpoints (weights or adapter, optimizer, scheduler, RNG states,
                                    trainer_state.json) + motionforge_fingerprint.json
    tensorboard/                    TensorBoard event files (loss, learning rate, grad norm, throughput)
    final/                          the trained model (LoRA: the adapter) + processor + fingerprint
    summary.json                    loss curve, throughput, fingerprints (what the Prefect artifact shows)

A run started again on the same folder resumes from the newest checkpoint (Trainer's
``resume_from_checkpoint``: model, optimizer, scheduler and RNG states, and the batches of the current epoch
already seen are skipped). The data order comes from accelerate's seeded sampler (seed + epoch), and frame
times from (seed, epoch, sample id), so the resumed run sees the same batches as an uninterrupted one. A
checkpoint whose fingerprints differ from the current config / data is refused with a clear error.

Several processes: start this module's :func:`main` under ``torchrun`` / ``accelerate launch`` (DDP, or FSDP /
DeepSpeed ZeRO per ``distributed``); the Trainer reads the launcher's environment. Ray Train: see
:mod:`stages.training.ray_train`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from stages.training.collator import VlmCollator
from stages.training.config import TrainConfig, config_fingerprint
from stages.training.data import VideoConversationDataset, data_fingerprint, load_samples
from stages.training.model import load_full_weights, trainable_summary
from stages.training.parts import load_parts_weights, parts_of, save_parts_weights

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "motionforge_fingerprint.json"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class FingerprintMismatchError(RuntimeError):
    pass


def checkpoints_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def last_checkpoint(cfg: TrainConfig) -> Path | None:
    d = checkpoints_dir(cfg)
    if not d.is_dir():
        return None
    # the fingerprint is written after the Trainer finished the checkpoint: a folder without it is a save
    # that a kill interrupted, and the one before it is resumed instead
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _CKPT_RE.match(p.name)) and p.is_dir()
             and (p / "trainer_state.json").exists() and (p / FINGERPRINT_FILE).exists()]
    return max(found)[1] if found else None


def fingerprint_record(cfg: TrainConfig, data_fp: str, n_samples: int) -> dict:
    import torch
    import transformers

    return {"config_fingerprint": config_fingerprint(cfg), "data_fingerprint": data_fp, "train_samples": n_samples,
            "model_id": cfg.model.model_id, "model_revision": cfg.model.revision, "method": cfg.method,
            "config": cfg.model_dump(mode="json"),
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__}}


def check_resumable(ckpt: Path, record: dict) -> None:
    path = ckpt / FINGERPRINT_FILE
    if not path.exists():
        raise FingerprintMismatchError(f"{ckpt} has no {FINGERPRINT_FILE}: not a motionforge checkpoint; "
                                       "train into a new output_dir")
    old = json.loads(path.read_text(encoding="utf-8"))
    for key in ("config_fingerprint", "data_fingerprint"):
        if old.get(key) != record[key]:
            raise FingerprintMismatchError(
                f"cannot resume from {ckpt}: its {key} is {old.get(key)} but the current run's is {record[key]} "
                "(the config or the training data changed); train into a new output_dir, or restore the old "
                "config / data")


def _callbacks(dataset: VideoConversationDataset, record: dict, tb_dir: Path | None):
    from transformers import TrainerCallback

    class EpochFrames(TrainerCallback):
        """Tells the dataset the epoch before the epoch's dataloader iterator (and its workers) is made."""

        def on_epoch_begin(self, args, state, control, **kw):
            dataset.set_epoch(int((state.epoch or 0.0) + 1e-6))

    class Fingerprint(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if ckpt.is_dir():
                    if kw.get("model") is not None:  # the papers' parts' weights (before the fingerprint)
                        save_parts_weights(kw["model"], ckpt)
                    _write_json(ckpt / FINGERPRINT_FILE, {**record, "global_step": state.global_step})

    cbs: list[Any] = [EpochFrames(), Fingerprint()]
    if tb_dir is not None:
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        cbs.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(tb_dir))))
    return cbs


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _use_bf16(cfg: TrainConfig) -> bool:
    import torch

    if cfg.bf16 is not None:
        return cfg.bf16
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_arguments(cfg: TrainConfig):
    import torch
    from transformers import TrainingArguments

    o = cfg.optim
    d = cfg.distributed
    kwargs: dict[str, Any] = {}
    if d.strategy == "fsdp":
        kwargs["fsdp"] = d.fsdp
        if d.fsdp_config:
            kwargs["fsdp_config"] = dict(d.fsdp_config)
    elif d.strategy == "deepspeed":
        kwargs["deepspeed"] = d.deepspeed_config
    return TrainingArguments(
        output_dir=str(checkpoints_dir(cfg)),
        per_device_train_batch_size=o.per_device_batch_size,
        gradient_accumulation_steps=o.gradient_accumulation_steps,
        learning_rate=o.learning_rate, weight_decay=o.weight_decay, optim="adamw_torch",
        warmup_steps=o.warmup_ratio,  # a float in [0, 1) is a share of the total steps (iMOVE B.1: 0.03)
        lr_scheduler_type=o.lr_scheduler_type, num_train_epochs=o.num_epochs, max_steps=o.max_steps,
        max_grad_norm=o.max_grad_norm, seed=o.seed, data_seed=o.seed,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, report_to="none",
        dataloader_num_workers=cfg.dataloader_num_workers, remove_unused_columns=False,
        bf16=_use_bf16(cfg), use_cpu=not torch.cuda.is_available(),
        # on CPU, processes started by a launcher talk over gloo; a single process needs no backend
        ddp_backend="gloo" if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        average_tokens_across_devices=True,  # the loss is a mean over all processes' tokens, as in one process
        include_num_input_tokens_seen="non_padding",
        **kwargs,
    )


def build_trainer(cfg: TrainConfig, extra_callbacks: tuple = ()):
    """(trainer, record, n_train): model, data, collator and callbacks wired into a ``Trainer``."""
    from transformers import Trainer

    from stages.training.model import load_model_for_training

    samples = load_samples(cfg.data, "train")
    if not samples:
        raise ValueError(f"no training samples in {[s.path for s in cfg.data.sources]} (after the held-out split)")
    record = fingerprint_record(cfg, data_fingerprint(samples), len(samples))
    model, processor = load_model_for_training(cfg)
    dataset = VideoConversationDataset(samples, cfg.data.num_frames, cfg.data.short_side, train=True,
                                       seed=cfg.optim.seed)
    args = training_arguments(cfg)
    tb_dir = Path(cfg.output_dir) / "tensorboard" if "tensorboard" in cfg.report_to and args.process_index == 0 else None
    parts = parts_of(model)
    collator = (VlmCollator(processor, cfg.data.num_frames) if parts is None else
                VlmCollator(processor, cfg.data.num_frames, parts=parts, video_token_id=model.config.video_token_id))
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                      callbacks=_callbacks(dataset, record, tb_dir) + list(extra_callbacks))
    trainer.motionforge_processor = processor
    return trainer, record, len(samples)


def loss_curve(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(int(h["step"]), float(h["loss"])) for h in log_history if "loss" in h and "step" in h]


def run_training(cfg: TrainConfig, resume: bool = True, extra_callbacks: tuple = ()) -> dict:
    """Train (or resume) the run in ``cfg.output_dir``; returns the summary (also written as summary.json on
    the main process)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainer, record, n_train = build_trainer(cfg, extra_callbacks)
    params = trainable_summary(trainer.model)
    main = trainer.args.process_index == 0
    if main:
        _write_json(out / "config.json", cfg.model_dump(mode="json"))
    ckpt = last_checkpoint(cfg) if resume else None
    if ckpt is not None:
        check_resumable(ckpt, record)
        log.info("resuming from %s", ckpt)
        if not (ckpt / "adapter_config.json").exists():
            # the Trainer's own resume loads the weights non-strictly under the model's names, which misses
            # every weight of a family saved under its released names (Qwen2-VL: visual.*, model.layers.*);
            # loaded here with transformers' renamings, the Trainer's load then finds nothing to change
            load_full_weights(trainer.model, ckpt)
        load_parts_weights(trainer.model, ckpt)  # an adapter checkpoint holds the LoRA weights only
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    wall = time.time() - t0
    state = trainer.state
    final = out / "final"
    trainer.save_model(str(final))
    if main:
        trainer.motionforge_processor.save_pretrained(str(final))
        save_parts_weights(trainer.model, final)
        _write_json(final / FINGERPRINT_FILE, {**record, "global_step": state.global_step})
    steps_run = state.global_step - (int(ckpt.name.split("-")[1]) if ckpt else 0)
    global_batch = trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps * trainer.args.world_size
    tokens = float(state.num_input_tokens_seen - (getattr(trainer, "_initial_num_input_tokens_seen", 0) or 0))
    summary = {
        "output_dir": str(out), "final": str(final), "resumed_from": str(ckpt) if ckpt else None,
        "global_step": state.global_step, "steps_this_run": steps_run, "world_size": trainer.args.world_size,
        "global_batch_size": global_batch, "train_samples": n_train,
        "loss_curve": loss_curve(state.log_history),
        "train_runtime_s": float(result.metrics.get("train_runtime", wall)),
        "samples_per_s": steps_run * global_batch / wall if wall > 0 else None,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "config_fingerprint": record["config_fingerprint"], "data_fingerprint": record["data_fingerprint"],
        **params,
    }
    if main:
        _write_json(out / "summary.json", summary)
    return summary


def launch_command(config_path: str | Path, nproc: int, python: str | None = None) -> list[str]:
    """The ``torchrun`` command that runs :func:`main` on ``nproc`` local processes (one per GPU)."""
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "stages.training.trainer", str(config_path)]


def main(argv: list[str] | None = None) -> int:
    """Entry point for launchers: ``python -m stages.training.trainer CONFIG.json [--no-resume]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m stages.training.trainer CONFIG.json [--no-resume]", file=sys.stderr)
        return 2
    cfg = TrainConfig.model_validate(json.loads(Path(argv[0]).read_text(encoding="utf-8")))
    run_training(cfg, resume="--no-resume" not in argv)
    close_process_group()  # only after a finished run: see there
    return 0


def close_process_group() -> None:
    """Destroy the launcher's process group (the Trainer creates it and never destroys it) before the
    interpreter exits, as PyTorch asks. Left to interpreter shutdown, gloo's worker threads can still hold work
    (tensors with Python references) while the interpreter is torn down: the rank aborts ("terminate called
    without an active exception", SIGABRT) after a finished run, and torchrun then kills the other ranks, rank
    0 possibly before it wrote summary.json. Not called when training raised: another rank may then be inside a
    collective, and destroying the group would wait for it; the launcher ends such a run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
