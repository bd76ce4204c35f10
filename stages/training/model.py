"""The model to train: loaded through the experts' loader, parts plugged in, frozen / LoRA-wrapped per config.

iMOVE B.1: the vision tower stays frozen, the projector trains in full, the language model gets LoRA (peft).
``method="full"`` trains the language model and projector in full instead. Which module is the vision tower
and which the projector depends on the family; :data:`FAMILY_PARTS` names them by ``config.model_type``.
"""
from __future__ import annotations

import importlib
import logging
import re
from typing import Any

from stages.training.config import ModelPart, TrainConfig

log = logging.getLogger(__name__)

# model_type -> (vision tower prefix, projector prefix, language model prefix) in named_modules() of the
# transformers 5 ForConditionalGeneration classes
FAMILY_PARTS = {
    "qwen2_vl": ("model.visual", "model.visual.merger", "model.language_model"),
    "qwen2_5_vl": ("model.visual", "model.visual.merger", "model.language_model"),
    "internvl": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
}


def family_parts(model: Any) -> tuple[str, str, str]:
    mt = getattr(model.config, "model_type", None)
    if mt not in FAMILY_PARTS:
        raise ValueError(f"model_type {mt!r} is not a supported VLM family for training; known: {sorted(FAMILY_PARTS)}")
    return FAMILY_PARTS[mt]


def resolve_callable(target: str):
    mod, sep, name = target.partition(":")
    if not sep or not mod or not name:
        raise ValueError(f"model part target {target!r} must be 'package.module:function'")
    fn = getattr(importlib.import_module(mod), name, None)
    if not callable(fn):
        raise ValueError(f"model part target {target!r} is not a callable")
    return fn


def apply_model_parts(model: Any, processor: Any, parts: tuple[ModelPart, ...]) -> tuple[Any, Any]:
    """Call each configured part as ``fn(model, processor, **kwargs)``; it returns (model, processor)."""
    for part in parts:
        out = resolve_callable(part.target)(model, processor, **part.kwargs)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(f"model part {part.target} must return (model, processor), got {type(out).__name__}")
        model, processor = out
        log.info("model part %s applied", part.target)
    return model, processor


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def load_model_for_training(cfg: TrainConfig, device: str = "cpu") -> tuple[Any, Any]:
    """(model, processor) ready for the Trainer: on ``device`` (the Trainer moves it for accelerators)."""
    from transformers import set_seed

    from experts.vlm import VlmSpec, load_transformers_weights

    spec = VlmSpec(model_id=cfg.model.model_id, revision=cfg.model.revision, device=device, dtype=cfg.model.dtype)
    extra = {"attn_implementation": cfg.model.attn_implementation} if cfg.model.attn_implementation else {}
    model, processor = load_transformers_weights(spec, **extra)
    model.train()
    processor.tokenizer.padding_side = "right"
    # seeded after loading (building a tiny:// checkpoint draws from the global RNG too): LoRA's A matrices and
    # any part's new weights are then the same in every run and every process
    set_seed(cfg.optim.seed)
    vision, projector, language = family_parts(model)

    def trains(name: str) -> bool:
        if _under(name, projector):
            return cfg.train_projector
        if _under(name, vision):
            return not cfg.freeze_vision_tower
        return cfg.method == "full"

    # roles are decided on the names as loaded: a part may wrap a module (the fused vision tower moves the
    # tower's weights under `visual.tower.`), and its weights keep the role they had; a parameter the parts
    # created (or replaced: resized embeddings) is new and trains
    role = {id(p): trains(n) for n, p in model.named_parameters()}
    model, processor = apply_model_parts(model, processor, cfg.model_parts)
    new_params = set()
    for name, p in model.named_parameters():
        if id(p) not in role:
            new_params.add(name)
        p.requires_grad_(role.get(id(p), True))
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.method == "lora":
        model = wrap_lora(model, cfg, vision, projector, language, new_params)
    return model, processor


def wrap_lora(model: Any, cfg: TrainConfig, vision: str, projector: str, language: str, new_params: set[str]) -> Any:
    from peft import LoraConfig, get_peft_model

    names = "|".join(cfg.lora.target_modules)
    # LoRA on the language model's linear layers only (never the vision tower's blocks)
    target = "^" + re.escape(language) + r"\..*\.(" + names + ")$"
    save = []
    if cfg.train_projector:
        save.append(projector.rsplit(".", 1)[-1])
    if not cfg.freeze_vision_tower:
        save.append(vision.rsplit(".", 1)[-1])
    save += list(cfg.lora.extra_trainable)
    from stages.training.parts import parts_of, trainable_parameter_names

    parts = parts_of(model)
    extra: dict[str, Any] = {}
    if parts is not None and parts.new_token_ids:
        # the added position tokens' embedding rows (and the tied output rows) train; the rest stays frozen
        extra["trainable_token_indices"] = sorted(set(parts.new_token_ids))
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=target, modules_to_save=save or None, bias="none", **extra)
    model = get_peft_model(model, lcfg)
    # the papers' parts' own parameters train in full (saved beside the adapter: stages.training.parts)
    handled = set(trainable_parameter_names(model))
    for name, p in model.named_parameters():
        if name in handled:
            p.requires_grad_(True)
    handled = {n.removeprefix("base_model.model.") for n in handled}
    if parts is not None:
        handled |= {n for n in new_params if "embed_tokens" in n or n.startswith("lm_head")}
    left = sorted(new_params - handled)
    if left and not cfg.lora.extra_trainable:
        log.warning("model parts added parameters %s but lora.extra_trainable is empty: they will not train "
                    "under LoRA", left[:5])
    return model


def _loading_keys(model: Any, state: dict) -> dict:
    """``save_pretrained`` writes some families' weights under their released names (Qwen2-VL: ``visual.*``
    for ``model.visual.*``); rename the keys the model does not know with transformers' own load-time renamings."""
    known = set(model.state_dict())
    if all(k in known for k in state):
        return state
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    out = {}
    for key, value in state.items():
        if key not in known:
            for t in renamings:
                key = t.rename_source_key(key)[0]
        out[key] = value
    return out


def load_full_weights(model: Any, ckpt: Any) -> None:
    """Load a full fine-tuning checkpoint's ``model*.safetensors`` into ``model`` (built as at training:
    base model + parts); every saved weight must fit and only the tied output head may be absent."""
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted(Path(ckpt).glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt}: neither an adapter (adapter_config.json) nor model*.safetensors")
    state: dict = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(_loading_keys(model, state), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise ValueError(f"{ckpt}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def trainable_summary(model: Any) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"parameters": int(total), "trainable": int(trainable)}
