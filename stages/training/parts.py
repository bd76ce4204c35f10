"""The papers' model parts (:mod:`experts.model_parts`) as a training ``model_parts`` hook.

Configure them in a :class:`~stages.training.config.TrainConfig` by name::

    "model_parts": [{"target": "stages.training.parts:papers_model_parts",
                     "kwargs": {"temporal_fusion": {"method": "te_fusion", "rate": 2},
                                "position_tokens": {"mode": "tokens"}}}]

The kwargs are the fields of :class:`experts.model_parts.ModelPartsConfig`. The hook changes the model and
tokenizer in place and records the :class:`~experts.model_parts.AppliedModelParts` on the model
(:func:`experts.model_parts.attach_parts`). From there:

* the training collator writes the conversations in the model's text form (``to_model_text``: boxes become
  coordinate tokens in ``tokens`` mode) and rewrites each batch with ``prepare_batch`` (fused video
  placeholders and grid);
* under LoRA the parts' new parameters train in full (:func:`trainable_parameter_names`) and are saved beside
  the adapter in :data:`PARTS_WEIGHTS` (:func:`save_parts_weights`); the new token rows train through peft's
  ``trainable_token_indices`` and are saved in the adapter;
* :mod:`stages.training.evaluate` re-applies the parts from the checkpoint's recorded config, loads the saved
  weights, and the VLM expert's generation applies the same text and batch rewrites.

Event-aware compression (iMOVE 3.2.1) runs inside the model's own forward (:func:`experts.model_parts.event_vlm.
enable_event_compression`): the collator repeats each sampled frame into its own tower slot (``prepare_video``)
and shrinks the video placeholders to the compressed count (``prepare_batch``); the model encodes the frames,
finds the events, compresses and scatters the tokens, and places them with its own M-RoPE rule, in training
and in ``generate()`` alike. It has no parameters, so there is nothing extra to train or save.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from experts.model_parts import AppliedModelParts, ModelPartsConfig, apply_model_parts, attach_parts, attached_parts

PARTS_WEIGHTS = "model_parts.safetensors"


def papers_model_parts(model: Any, processor: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``TrainConfig.model_parts`` target: apply :class:`ModelPartsConfig(**kwargs)` to the loaded model."""
    import stages.shared.relative_tokens as codec

    cfg = ModelPartsConfig.model_validate(kwargs)
    if attached_parts(model) is not None:
        raise ValueError("papers_model_parts is configured twice; give one entry with all parts")
    applied = apply_model_parts(model, processor, cfg, codec=codec)
    for p in applied.new_parameters.values():
        p.requires_grad_(True)
    attach_parts(model, applied)
    return model, processor


def parts_of(model: Any) -> AppliedModelParts | None:
    return attached_parts(model)


def trainable_parameter_names(model: Any) -> list[str]:
    """Full names (in ``model.named_parameters()``) of the parameters the attached parts created."""
    applied = attached_parts(model)
    if applied is None or not applied.new_parameters:
        return []
    ids = {id(p) for p in applied.new_parameters.values()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def parts_state(model: Any) -> dict:
    """The parts' own parameters by their full name in ``model`` (peft prefixes stripped), detached on CPU."""
    applied = attached_parts(model)
    if applied is None or not applied.new_parameters:
        return {}
    ids = {id(p) for p in applied.new_parameters.values()}
    return {_base_name(n): p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if id(p) in ids}


def _base_name(name: str) -> str:
    return name.removeprefix("base_model.model.")


def save_parts_weights(model: Any, folder: str | Path) -> Path | None:
    """Write the parts' parameters to ``folder/model_parts.safetensors`` (nothing when there are none)."""
    state = parts_state(model)
    if not state:
        return None
    from safetensors.torch import save_file

    path = Path(folder) / PARTS_WEIGHTS
    save_file(state, str(path))
    return path


def load_parts_weights(model: Any, folder: str | Path) -> bool:
    """Load ``folder/model_parts.safetensors`` into the (re-applied) parts; False when the folder has none.
    Every saved tensor must land on a parameter of the attached parts, and every such parameter be saved."""
    path = Path(folder) / PARTS_WEIGHTS
    if not path.exists():
        return False
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(path))
    applied = attached_parts(model)
    ids = {id(p) for p in applied.new_parameters.values()} if applied is not None else set()
    params = {_base_name(n): p for n, p in model.named_parameters() if id(p) in ids}
    if set(saved) != set(params):
        raise ValueError(f"{path}: saved part weights {sorted(saved)[:5]} do not match the re-applied parts' "
                         f"{sorted(params)[:5]} (was the run trained with other model_parts?)")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(device=p.device, dtype=p.dtype))
    return True
