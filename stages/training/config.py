"""The training config: what to fine-tune, on which data, how (iMOVE B.1), where the run lives.

One frozen pydantic model, so the Prefect ``train`` deployment renders it as a form and a checkpoint can
record it verbatim (:func:`config_fingerprint`). Defaults follow iMOVE B.1: LoRA on the language model,
vision tower frozen, projector trained, AdamW with a 0.03 warm-up ratio.

``model_parts`` is the hook for the papers' model parts (event-aware compression, TE Fusion, ...): each
entry names an importable callable ``"package.module:function"`` and its keyword arguments; after the model
is loaded (and before LoRA wraps it) every callable is called as ``fn(model, processor, **kwargs)`` and returns
the (possibly replaced) model and processor. Parameters a part creates stay trainable; list their module
names in ``lora.extra_trainable`` when LoRA is on so they are saved with the adapter.
"""
from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())


class ModelConfig(_Frozen):
    model_id: str = Field("Qwen/Qwen2-VL-7B-Instruct", description="HF id, local path, or tiny://qwen2_vl | "
                          "tiny://qwen2_5_vl | tiny://internvl")
    revision: str | None = None
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 on CUDA, fp32 on CPU")
    attn_implementation: str | None = Field(None, description="e.g. sdpa, flash_attention_2; None: the model's default")
    gradient_checkpointing: bool = False


class DataSource(_Frozen):
    """One source of training conversations. ``imove_it``: an output root's ``tasks`` table (status ok) or an
    ``export imove-it`` JSONL; ``conversations``: a LLaVA/ShareGPT-style JSONL (``conversations`` with optional
    ``video`` + ``clip_start_s``/``clip_end_s``) mixed in as-is."""

    kind: Literal["imove_it", "conversations"] = "imove_it"
    path: str
    tasks: tuple[str, ...] | None = Field(None, description="iMOVE-IT tasks to use (default: all)")
    max_samples: int | None = Field(None, ge=1, description="take the first N samples (after the split)")
    repeat: int = Field(1, ge=1, description="list each sample this many times (mixing weight)")
    video_root: str | None = Field(None, description="folder that relative video paths are resolved against")


class DataConfig(_Frozen):
    sources: tuple[DataSource, ...] = ()
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="held-out share of iMOVE-IT clips")
    split_seed: int = 0
    num_frames: int = Field(8, ge=1, description="N segments, one frame each (iMOVE samples the video this way)")
    short_side: int | None = Field(448, ge=8, description="resize frames to this short side before the processor")


class LoraConfig(_Frozen):
    r: int = Field(64, ge=1)
    alpha: int = Field(128, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    extra_trainable: tuple[str, ...] = Field((), description="module names trained in full and saved with the "
                                             "adapter besides the projector (e.g. model parts)")


class OptimConfig(_Frozen):
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    lr_scheduler_type: str = "cosine"
    per_device_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="> 0 overrides num_epochs")
    max_grad_norm: float = 1.0
    seed: int = 0


class DistributedConfig(_Frozen):
    """How several GPUs are used. ``none``/``ddp``: plain data parallel (what torchrun / accelerate launch give
    by default); ``fsdp``: transformers' FSDP options; ``deepspeed``: a ZeRO JSON config file."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = "none"
    nproc_per_node: int = Field(1, ge=1, description="processes (GPUs) per node for the launcher")
    fsdp: str = "full_shard auto_wrap"
    fsdp_config: dict | None = None
    deepspeed_config: str | None = None
    ray_workers: int = Field(0, ge=0, description="> 0: run with Ray Train's TorchTrainer on this many workers")
    ray_address: str | None = None
    ray_use_gpu: bool = True


class ModelPart(_Frozen):
    target: str = Field(..., description="'package.module:function' called as fn(model, processor, **kwargs)")
    kwargs: dict = Field(default_factory=dict)


class TrainConfig(_Frozen):
    output_dir: str = Field(..., description="run folder under the output root: checkpoints, logs, fingerprints")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: Literal["lora", "full"] = "lora"
    freeze_vision_tower: bool = True
    train_projector: bool = True
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    model_parts: tuple[ModelPart, ...] = ()
    bf16: bool | None = Field(None, description="None: on when CUDA supports bf16")
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(500, ge=1)
    save_total_limit: int | None = 3
    dataloader_num_workers: int = Field(2, ge=0)
    report_to: tuple[str, ...] = ("tensorboard",)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.distributed.strategy == "deepspeed" and not self.distributed.deepspeed_config:
            raise ValueError("distributed.strategy=deepspeed needs distributed.deepspeed_config (a ZeRO JSON file)")
        return self


# Fields that change how a run executes, not what it learns: left out of the fingerprint, so a run resumed
# with more workers or another logging cadence keeps its identity.
_NOT_FINGERPRINTED = {"output_dir", "logging_steps", "save_steps", "save_total_limit", "dataloader_num_workers",
                      "report_to"}


def config_fingerprint(cfg: TrainConfig) -> str:
    data = cfg.model_dump(mode="json", exclude=_NOT_FINGERPRINTED)
    data["distributed"] = {k: v for k, v in data["distributed"].items() if k in ("strategy",)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
