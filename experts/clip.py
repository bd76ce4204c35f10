"""Image-text scorer: CLIP through open_clip_torch (ViT-B/32 by default, as in the iMOVE paper).

Construction (``build_clip``), loading (``load_clip``) and inference (``Clip`` methods) are separate.
``ClipSpec.model_id`` says where the weights come from:

* a pretrained tag of ``arch`` (``"openai"``, ``"laion2b_s34b_b79k"``, ...), resolved through open_clip's
  own table and the Hugging Face cache;
* a local checkpoint file (``.pt``, ``.bin``, ``.safetensors``) for ``arch``;
* a local directory holding ``open_clip_config.json`` and weights (the layout of open_clip hub repos);
* ``"hf-hub:org/repo"`` (revision pinnable);
* ``"tiny://clip"``, the random-initialised miniature used by tests and the ``tiny`` profile.

Every embedding is L2-normalised float32, so a dot product is a cosine similarity.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from experts.base import (TINY_SCHEME, ModelSpec, WeightsNotFoundError, inference_mode, missing_weights_message,
                          register_tiny, resolve_device, resolve_dtype, resolve_tiny)

DEFAULT_TEMPLATE = "a photo of a {label}."
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class ClipSpec(ModelSpec):
    """``arch`` is an open_clip model name; ``model_id`` a tag, checkpoint path, directory or ``hf-hub:`` id."""

    model_id: str = "openai"
    arch: str = "ViT-B-32"


class Clip:
    """A loaded CLIP model with its image preprocessing and tokenizer."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, spec: ClipSpec) -> None:
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.spec = spec
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype

    @property
    def name(self) -> str:
        return f"open_clip:{self.spec.arch}:{self.spec.model_id}@{self.spec.revision or 'default'}"

    @property
    def logit_scale(self) -> float:
        """The learned temperature (exp of the stored log scale), 100 for OpenAI's checkpoints."""
        return float(self.model.logit_scale.detach().float().exp().cpu())

    @staticmethod
    def prompts(labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
        """``["dog"] -> ["a photo of a dog."]``; ``template`` must contain ``{label}``."""
        if "{label}" not in template:
            raise ValueError(f"text template {template!r} has no '{{label}}' placeholder")
        return [template.format(label=label.strip()) for label in labels]

    # ------------------------------------------------------------------------------------- encoders

    @inference_mode
    def encode_images(self, images: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """``[N, D]`` L2-normalised embeddings of HxWx3 uint8 RGB images (crops of any size)."""
        import torch
        from PIL import Image

        _check_batch_size(batch_size)
        out: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pixels = torch.stack([self.preprocess(Image.fromarray(_check_image(img, start + k)))
                                  for k, img in enumerate(chunk)])
            feats = self.model.encode_image(pixels.to(self.device, self.dtype))
            out.append(_normalise(feats))
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    @inference_mode
    def encode_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """``[T, D]`` L2-normalised embeddings of texts, used as given (see :meth:`prompts`)."""
        _check_batch_size(batch_size)
        out: list[np.ndarray] = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size])).to(self.device)
            out.append(_normalise(self.model.encode_text(tokens)))
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    @functools.cached_property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if proj is not None and hasattr(proj, "shape"):
            return int(proj.shape[-1])
        return int(self.encode_texts(["a"]).shape[1])

    # -------------------------------------------------------------------------------------- scoring

    def score_pairs(self, images: list[np.ndarray], texts: list[str], batch_size: int = 64) -> np.ndarray:
        """``[N]`` cosine similarity of image i with text i (crop-versus-category filtering).

        Repeated texts are encoded once, since many crops share a category.
        """
        if len(images) != len(texts):
            raise ValueError(f"score_pairs needs one text per image, got {len(images)} images and {len(texts)} texts")
        if not images:
            return np.zeros((0,), np.float32)
        unique = list(dict.fromkeys(texts))
        text_emb = self.encode_texts(unique)
        row = {t: i for i, t in enumerate(unique)}
        img_emb = self.encode_images(images, batch_size=batch_size)
        return np.einsum("nd,nd->n", img_emb, text_emb[[row[t] for t in texts]]).astype(np.float32)

    def score_texts(self, images: list[np.ndarray], texts: list[str], batch_size: int = 64) -> np.ndarray:
        """``[N, T]`` cosine similarity of every image with every text."""
        return (self.encode_images(images, batch_size=batch_size) @ self.encode_texts(texts).T).astype(np.float32)

    def probs(self, images: list[np.ndarray], texts: list[str], batch_size: int = 64) -> np.ndarray:
        """``[N, T]`` softmax over the texts of ``logit_scale * cosine`` (CLIP zero-shot classification)."""
        return softmax(self.logit_scale * self.score_texts(images, texts, batch_size=batch_size))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _normalise(feats: Any) -> np.ndarray:
    feats = feats.float()
    feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return feats.cpu().numpy().astype(np.float32)


def _check_image(img: np.ndarray, index: int) -> np.ndarray:
    if not (isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8):
        desc = f"{type(img).__name__} {getattr(img, 'shape', '')} {getattr(img, 'dtype', '')}"
        raise ValueError(f"image {index} must be an HxWx3 uint8 RGB array, got {desc}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"image {index} is empty ({img.shape}); an empty crop cannot be scored")
    return img


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


class ClipTagger:
    """Zero-shot tagger: the vocabulary's text embeddings are computed once, images scored against them.

    ``score="cosine"`` (default) thresholds the raw cosine similarity, which suits multi-label tagging over a
    large vocabulary; ``score="softmax"`` thresholds the softmax over the vocabulary (single-label style).
    """

    def __init__(self, clip: Clip, vocabulary: list[str], threshold: float, top_k: int,
                 template: str = DEFAULT_TEMPLATE, score: Literal["cosine", "softmax"] = "cosine") -> None:
        if not vocabulary:
            raise ValueError("ClipTagger needs a non-empty vocabulary")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if score not in ("cosine", "softmax"):
            raise ValueError(f"score must be 'cosine' or 'softmax', got {score!r}")
        self.clip = clip
        self.vocabulary = list(vocabulary)
        self.threshold = float(threshold)
        self.top_k = int(top_k)
        self.score = score
        self.text_embeddings = clip.encode_texts(Clip.prompts(self.vocabulary, template))

    def scores(self, images: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """``[N, V]`` scores of each image against each vocabulary entry."""
        sims = self.clip.encode_images(images, batch_size=batch_size) @ self.text_embeddings.T
        return softmax(self.clip.logit_scale * sims) if self.score == "softmax" else sims.astype(np.float32)

    def tag(self, images: list[np.ndarray], batch_size: int = 64) -> list[list[tuple[str, float]]]:
        """Per image, up to ``top_k`` ``(tag, score)`` with score >= threshold, best first."""
        out: list[list[tuple[str, float]]] = []
        for row in self.scores(images, batch_size=batch_size):
            order = np.argsort(-row, kind="stable")[: self.top_k]
            out.append([(self.vocabulary[j], float(row[j])) for j in order if row[j] >= self.threshold])
        return out


# ------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class _Source:
    model_name: str  # open_clip model name, possibly with the 'local-dir:' schema
    pretrained: str | None  # checkpoint file for a built-in architecture
    kwargs: dict


def _local_dir_source(path: Path, model_id: str) -> _Source:
    if not (path / "open_clip_config.json").is_file():
        raise WeightsNotFoundError(
            f"CLIP checkpoint directory {path} (model id {model_id}) has no open_clip_config.json; pass the "
            "checkpoint file itself as model_id together with its arch, or a directory laid out like an "
            "open_clip hub repo")
    return _Source(f"local-dir:{path}", None, {})


def _hub_snapshot(repo_id: str, revision: str | None, model_id: str) -> Path:
    """Fetch (or find in the HF cache) the config and one weights file of an open_clip hub repo."""
    from huggingface_hub import snapshot_download

    try:
        base = ["open_clip_config.json", "*.txt", "tokenizer*", "special_tokens_map.json", "vocab*", "merges*"]
        path = Path(snapshot_download(repo_id, revision=revision,
                                      allow_patterns=base + ["open_clip_model.safetensors"]))
        if not any(path.glob("open_clip_*.safetensors")):
            path = Path(snapshot_download(repo_id, revision=revision,
                                          allow_patterns=base + ["open_clip_pytorch_model.bin"]))
    except Exception as exc:  # hub client errors vary by version (OSError, httpx, LocalEntryNotFound ...)
        raise WeightsNotFoundError(missing_weights_message(model_id, revision) + f" [{type(exc).__name__}]") from exc
    return path


def _resolve_source(spec: ClipSpec) -> _Source:
    """Map a spec to what ``open_clip.create_model_and_transforms`` needs, without surprises downloads aside."""
    import open_clip

    mid = spec.model_id
    if mid.startswith(TINY_SCHEME):
        return _local_dir_source(resolve_tiny(mid), mid)
    if mid.startswith("hf-hub:"):
        return _local_dir_source(_hub_snapshot(mid[len("hf-hub:"):], spec.revision, mid), mid)
    if mid.startswith("local-dir:"):
        mid = mid[len("local-dir:"):]
    candidates = [Path(os.path.expanduser(mid))]
    if os.environ.get("MOTIONFORGE_WEIGHTS"):
        candidates.append(Path(os.environ["MOTIONFORGE_WEIGHTS"]) / mid)
    for path in candidates:
        if path.is_dir():
            return _local_dir_source(path, spec.model_id)
        if path.is_file():
            return _Source(spec.arch, str(path), {})
    if mid.startswith(("/", "./", "../", "~")) or mid.endswith(_CHECKPOINT_SUFFIXES):
        raise WeightsNotFoundError(
            f"local CLIP checkpoint {spec.model_id} does not exist; check the path, set MOTIONFORGE_WEIGHTS, "
            "or run with --profile tiny")
    cfg = open_clip.get_pretrained_cfg(spec.arch, mid)
    if not cfg:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(spec.arch)) or "none"
        raise ValueError(f"CLIP model_id {spec.model_id!r} is not a local checkpoint, an 'hf-hub:' id or a "
                         f"pretrained tag of {spec.arch} (known tags: {known})")
    try:
        path = open_clip.download_pretrained(cfg)
    except Exception as exc:  # as above: any failure here means the weights cannot be had
        raise WeightsNotFoundError(missing_weights_message(f"{spec.arch}/{mid}") + f" [{type(exc).__name__}]") from exc
    if not path:
        raise WeightsNotFoundError(missing_weights_message(f"{spec.arch}/{mid}"))
    # Passing the file (not the tag) skips a second hub round trip, so the tag's own settings go along:
    # OpenAI's weights were trained with QuickGELU, and some tags use other normalisation constants.
    kwargs: dict = {"force_quick_gelu": bool(cfg.get("quick_gelu", False))}
    for src, dst in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"),
                     ("resize_mode", "image_resize_mode")):
        if src in cfg:
            kwargs[dst] = cfg[src]
    return _Source(spec.arch, path, kwargs)


def build_clip(model_name: str, **kwargs: Any) -> Any:
    """Construction only: an open_clip model of ``model_name`` with random weights."""
    import open_clip

    return open_clip.create_model(model_name, pretrained=None, **kwargs)


def load_clip(spec: ClipSpec) -> Clip:
    """Load a CLIP model for ``spec`` (see the module docstring for what ``model_id`` may be)."""
    import open_clip

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    src = _resolve_source(spec)
    # Weights load on the CPU in fp32 (safetensors / weights_only), then move: one code path for all devices.
    model, _, preprocess = open_clip.create_model_and_transforms(
        src.model_name, pretrained=src.pretrained, device="cpu", weights_only=True, **src.kwargs)
    tokenizer = open_clip.get_tokenizer(src.model_name)
    model.to(device=device, dtype=dtype).eval()
    return Clip(model, preprocess, tokenizer, spec)


# Miniature open_clip config: a 1-layer ViT on 32 px images and a 1-layer text tower; the BPE tokenizer
# (bundled with open_clip) is the real one, so any English prompt tokenises.
_TINY_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@register_tiny("clip")
def build_tiny_clip(out_dir: Path) -> None:
    """Write a random-initialised miniature open_clip model (config + safetensors) to ``out_dir``."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    # Registering the config also makes the miniature available by name ("motionforge-tiny-clip").
    cfg_dir = out_dir / "_model_configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "motionforge-tiny-clip.json").write_text(json.dumps(_TINY_MODEL_CFG, indent=2))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(0)
    model = build_clip("motionforge-tiny-clip")
    preprocess_cfg = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}
    (out_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": _TINY_MODEL_CFG, "preprocess_cfg": preprocess_cfg}, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / "open_clip_model.safetensors"))


__all__ = ["Clip", "ClipSpec", "ClipTagger", "DEFAULT_TEMPLATE", "build_clip", "load_clip", "softmax"]
