"""RAM++ weight loading: find the checkpoint and its tag vocabulary, build the model, load it strictly.

The released checkpoint is a ``torch.save`` of ``{"model": state_dict, ...}``. It is read on the CPU with
``weights_only=True`` (memory-mapped when the file format allows), the model is built on the meta device
(no random initialisation of ~330 M parameters), the tensors are assigned with ``strict=True`` -- any
missing, unexpected or mis-shaped entry is an error -- and only then is it moved to the spec's device/dtype.

The tag vocabulary is not on PyPI: no registry package ships the 4,585 tag names or their thresholds, so
they are read from ``ram_tag_list.txt`` / ``ram_tag_list_threshold.txt`` placed beside the checkpoint (see
``spec.py`` for the format).
"""
from __future__ import annotations

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
from .model import RamPlusConfig, RamPlusModel, build_ram_plus_model
from .spec import DEFAULT_TAG_THRESHOLD, TAG_LIST_FILE, TAG_THRESHOLD_FILE, RamPlusSpec


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


def load_vocabulary(directory: str | os.PathLike[str]) -> tuple[list[str], list[float]]:
    """Tag names and per-tag thresholds from ``directory``.

    Thresholds: the file's values in order; tags beyond the file's end, or every tag when there is no
    threshold file, get 0.68 (the reference default).
    """
    d = Path(directory)
    tag_file = d / TAG_LIST_FILE
    if not tag_file.is_file():
        raise VocabularyNotFoundError(
            f"RAM++ tag list {tag_file} not found. Place {TAG_LIST_FILE} (UTF-8, one tag per line, in the "
            f"checkpoint's label order: the 4,585-line ram/data/{TAG_LIST_FILE} of the recognize-anything "
            f"release) and optionally {TAG_THRESHOLD_FILE} (one threshold per line, same order) beside the "
            f"checkpoint, or point RamPlusSpec.vocab_dir at their folder"
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
    naming of the tagging head) is applied here too, and a one-element ``logit_scale`` is read as a scalar;
    nothing is dropped or added, so ``strict=True`` still sees every entry.
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
        if key == "logit_scale" and value.numel() == 1:
            # An unused training scalar; accept it saved as [] or [1] (CLIP code bases use both).
            value = value.reshape(())
        state[key] = value
    return state


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
    """``load_state_dict(strict=True, assign=True)`` with an error that names the file and the fix."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointMismatchError(
            f"{source} does not match the RAM++ architecture {model.config.image_size} px / "
            f"Swin embed {model.config.swin_embed_dim}: {exc}. Check RamPlusSpec.variant and image_size "
            f"(the released ram_plus_swin_large_14m.pth is variant='swin_l', image_size=384)"
        ) from exc
    model.reset_derived_buffers()
    return model


def load_ram_plus(spec: RamPlusSpec) -> RamPlus:
    """Build RAM++ for ``spec``, load its checkpoint strictly, move it to the spec's device and dtype."""
    checkpoint = resolve_checkpoint(spec)
    tags, thresholds = load_vocabulary(spec.vocab_dir or checkpoint.parent)
    state = read_state_dict(checkpoint)
    cfg = config_for(spec, state, len(tags))
    model = load_into(build_ram_plus_model(cfg, device="meta"), state, str(checkpoint))
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return RamPlus(model, tags, thresholds, name=spec.model_id, device=device, dtype=dtype)
