"""RAM++ weight loading: find the checkpoint and its tag vocabulary, build the model, load it strictly.

The released checkpoint is a ``torch.save`` of ``{"model": state_dict, ...}``. It is read on the CPU with
``weights_only=True`` (memory-mapped when the file format allows), the model is built on the meta device
(no random initialisation of ~330 M parameters), the tensors are assigned with ``strict=True`` -- any
missing, unexpected or mis-shaped entry is an error -- and only then is it moved to the spec's device/dtype.

Layout: the reference model's state dict (recognize-anything ``ram/models/ram_plus.py``), whose trained
``reweight_scale`` is used as stored. Two variants that other code bases save are accepted with a logged
note: an extra ``logit_scale`` (a CLIP-style training scalar tagging never reads; dropped) and a missing
``reweight_scale`` (its reference initial value ``log(1/0.07)`` is used). Any other missing or unexpected
key is an error that names the keys.

The tag vocabulary (the released 4,585 tag names and per-tag thresholds, Apache-2.0) ships in this package
(``data/``); ``RamPlusSpec.vocab_dir``, or the two files placed beside the checkpoint, take precedence
(see ``spec.py`` for the format).
"""
from __future__ import annotations

import logging
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from experts.base import (
    WeightsNotFoundError,
    missing_weights_message,
    resolve_device,
    resolve_dtype,
    resolve_local,
)

from .inference import RamPlus
from .model import DEFAULT_REWEIGHT_SCALE, RamPlusConfig, RamPlusModel, build_ram_plus_model
from .spec import DEFAULT_TAG_THRESHOLD, TAG_LIST_FILE, TAG_THRESHOLD_FILE, RamPlusSpec

log = logging.getLogger(__name__)

# The released vocabulary, shipped as package data (LICENSE and NOTICE beside it).
PACKAGED_VOCAB_DIR = Path(__file__).resolve().parent / "data"


class VocabularyNotFoundError(WeightsNotFoundError):
    """The tag list that gives RAM++ outputs their names is missing or does not match the checkpoint."""


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's tensors do not match the architecture the spec asks for."""


def resolve_checkpoint(spec: RamPlusSpec) -> Path:
    """Local path of the ``.pth`` file for ``spec`` (Hugging Face cache or hub for repo ids)."""
    src = resolve_local(spec.model_id, spec.revision)
    p = Path(src)
    if p.is_file():
        return p
    if p.is_dir():
        named = p / spec.checkpoint_file
        if named.is_file():
            return named
        candidates = sorted(p.glob("*.pth"))
        if len(candidates) == 1:
            return candidates[0]
        raise WeightsNotFoundError(
            f"RAM++ checkpoint directory {p} has no {spec.checkpoint_file}"
            + (f" and several .pth files ({', '.join(c.name for c in candidates)}); set checkpoint_file"
               if candidates else "; put the checkpoint there or pass the .pth path as model_id")
        )
    return _from_hugging_face(spec)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _from_hugging_face(spec: RamPlusSpec) -> Path:
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
    except ImportError as exc:  # pragma: no cover - transformers always brings huggingface_hub
        raise WeightsNotFoundError(missing_weights_message(spec.model_id, spec.revision)) from exc
    cached = try_to_load_from_cache(spec.model_id, spec.checkpoint_file, revision=spec.revision)
    if isinstance(cached, str):
        return Path(cached)
    try:
        path = hf_hub_download(spec.model_id, spec.checkpoint_file, revision=spec.revision,
                               local_files_only=_hub_offline())
    except Exception as exc:  # hub errors come as many types (offline, 404, connection); all mean "not here"
        raise WeightsNotFoundError(
            missing_weights_message(f"{spec.model_id}/{spec.checkpoint_file}", spec.revision)
            + f" [{type(exc).__name__}]"
        ) from exc
    return Path(path)


def vocabulary_dir(spec: RamPlusSpec, checkpoint: Path) -> Path:
    """Where the tag list comes from: ``spec.vocab_dir`` if set; else the checkpoint's folder when it holds
    a tag list (a re-trained or miniature checkpoint brings its own); else the released list in the package."""
    if spec.vocab_dir:
        return Path(spec.vocab_dir)
    if (checkpoint.parent / TAG_LIST_FILE).is_file():
        return checkpoint.parent
    return PACKAGED_VOCAB_DIR


def load_vocabulary(directory: str | os.PathLike[str]) -> tuple[list[str], list[float]]:
    """Tag names and per-tag thresholds from ``directory``.

    Thresholds: the file's values in order; tags beyond the file's end, or every tag when there is no
    threshold file, get 0.68 (the reference default).
    """
    d = Path(directory)
    tag_file = d / TAG_LIST_FILE
    if not tag_file.is_file():
        raise VocabularyNotFoundError(
            f"RAM++ tag list {tag_file} not found. Point RamPlusSpec.vocab_dir at a folder holding "
            f"{TAG_LIST_FILE} (UTF-8, one tag per line, in the checkpoint's label order) and optionally "
            f"{TAG_THRESHOLD_FILE} (one threshold per line, same order), or leave vocab_dir unset to use the "
            f"released 4,585-tag list shipped with motionforge"
        )
    tags = tag_file.read_text(encoding="utf-8").splitlines()
    while tags and not tags[-1].strip():
        tags.pop()
    if not tags:
        raise VocabularyNotFoundError(f"RAM++ tag list {tag_file} is empty")
    thresholds = [DEFAULT_TAG_THRESHOLD] * len(tags)
    threshold_file = d / TAG_THRESHOLD_FILE
    if threshold_file.is_file():
        lines = threshold_file.read_text(encoding="utf-8").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) > len(tags):
            raise VocabularyNotFoundError(
                f"{threshold_file} has {len(lines)} thresholds but {tag_file} has {len(tags)} tags; "
                f"the two files must come from the same release"
            )
        for i, line in enumerate(lines):
            try:
                thresholds[i] = float(line.strip())
            except ValueError as exc:
                raise VocabularyNotFoundError(
                    f"{threshold_file} line {i + 1}: {line!r} is not a number") from exc
    return tags, thresholds


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a RAM++ checkpoint, read on the CPU with ``weights_only=True``.

    Accepts ``{"model": state_dict, ...}`` (the reference training scripts' format) or a bare state dict.
    The one key rename the reference loader applies (``vision_multi.`` -> ``tagging_head.``, from an older
    naming of the tagging head) is applied here too, and one-element scalars (``reweight_scale``,
    ``logit_scale``) saved as ``[1]`` are read as ``[]``; nothing is dropped or added here (see
    :func:`reconcile_variants`), so ``strict=True`` still sees every entry.
    """
    path = Path(path)
    try:
        try:
            obj: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointMismatchError(
            f"{path} holds objects other than tensors and plain containers, which torch.load(weights_only=True) "
            f"refuses to unpickle; if you trust the file, re-save only its tensors: "
            f"torch.save({{'model': torch.load(p, weights_only=False)['model']}}, new_path)"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(
            f"{path} is not a RAM++ checkpoint: expected a state dict or {{'model': state_dict}}")
    state = {}
    for key, value in obj.items():
        if key.startswith("vision_multi."):
            key = "tagging_head." + key[len("vision_multi."):]
        if key in SCALAR_KEYS and value.numel() == 1:
            # Scalars are saved as [] or [1] depending on the code base; the model holds them as [].
            value = value.reshape(())
        state[key] = value
    return state


SCALAR_KEYS = ("reweight_scale", "logit_scale")


def reconcile_variants(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The official layout, from the two accepted variants; each adjustment is logged.

    * ``logit_scale`` present: a CLIP-style alignment temperature that some training forks save; the
      reference model has no such entry and tagging does not read it, so it is dropped.
    * ``reweight_scale`` absent: checkpoints saved from forks that kept it as a constant; the reference
      initial value ``log(1/0.07)`` is what such a fork ran with, so that value is used.

    Everything else is left for the strict load to accept or refuse.
    """
    state = dict(state)
    if "logit_scale" in state:
        value = state.pop("logit_scale")
        log.info("RAM++ %s: dropped 'logit_scale' (%s), which the reference model does not have and tagging "
                 "does not use", source, _describe(value))
    if "reweight_scale" not in state:
        like = state.get("label_embed")
        state["reweight_scale"] = torch.tensor(DEFAULT_REWEIGHT_SCALE, dtype=like.dtype if like is not None
                                               and like.is_floating_point() else torch.float32)
        log.info("RAM++ %s: no 'reweight_scale' in the checkpoint; using the reference initial value "
                 "log(1/0.07) = %.4f", source, DEFAULT_REWEIGHT_SCALE)
    return state


def _describe(t: torch.Tensor) -> str:
    return f"value {float(t):.4f}" if t.numel() == 1 else f"shape {list(t.shape)}"


def config_for(spec: RamPlusSpec, state: dict[str, torch.Tensor], num_tags: int) -> RamPlusConfig:
    """Architecture for ``spec`` with the vocabulary size; the descriptions per tag come from the checkpoint."""
    rows = state.get("label_embed")
    if rows is None or rows.dim() != 2:
        raise CheckpointMismatchError("checkpoint has no 2-D 'label_embed'; it is not a RAM++ checkpoint")
    if rows.shape[0] % num_tags:
        raise CheckpointMismatchError(
            f"checkpoint has {rows.shape[0]} tag-description embeddings, not a multiple of the {num_tags} tags "
            f"in {TAG_LIST_FILE}: the tag list does not belong to this checkpoint"
        )
    return RamPlusConfig.for_variant(spec.variant, spec.image_size, num_tags=num_tags,
                                     descriptions_per_tag=rows.shape[0] // num_tags)


def load_into(model: RamPlusModel, state: dict[str, torch.Tensor], source: str) -> RamPlusModel:
    """``load_state_dict(strict=True, assign=True)`` with an error that names the file, the missing and
    unexpected keys, and the fix."""
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    hint = ("Check RamPlusSpec.variant and image_size (the released ram_plus_swin_large_14m.pth is "
            "variant='swin_l', image_size=384)")
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{source} does not have the RAM++ layout for {model.config.image_size} px / Swin embed "
            f"{model.config.swin_embed_dim}: missing keys {_key_list(missing)}; unexpected keys "
            f"{_key_list(unexpected)}. {hint}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # same names, different shapes
        raise CheckpointMismatchError(
            f"{source} does not match the RAM++ architecture {model.config.image_size} px / "
            f"Swin embed {model.config.swin_embed_dim}: {exc}. {hint}"
        ) from exc
    scale = float(model.reweight_scale.detach())
    if not math.isfinite(scale):
        raise CheckpointMismatchError(f"{source}: reweight_scale is {scale}, not a finite number")
    model.reset_derived_buffers()
    return model


def _key_list(keys: list[str], limit: int = 12) -> str:
    if not keys:
        return "(none)"
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_ram_plus(spec: RamPlusSpec) -> RamPlus:
    """Build RAM++ for ``spec``, load its checkpoint strictly, move it to the spec's device and dtype."""
    checkpoint = resolve_checkpoint(spec)
    tags, thresholds = load_vocabulary(vocabulary_dir(spec, checkpoint))
    state = reconcile_variants(read_state_dict(checkpoint), str(checkpoint))
    cfg = config_for(spec, state, len(tags))
    model = load_into(build_ram_plus_model(cfg, device="meta"), state, str(checkpoint))
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return RamPlus(model, tags, thresholds, name=spec.model_id, device=device, dtype=dtype)
