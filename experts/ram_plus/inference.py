"""RAM++ inference over plain numpy images: preprocessing, batched scoring, thresholding."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .model import RamPlusModel
from .spec import TagScore

# ImageNet statistics: RAM++ was trained with torchvision's Normalize on these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(images: Sequence[np.ndarray]) -> None:
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            desc = f"{type(img).__name__} {getattr(img, 'shape', '')} {getattr(img, 'dtype', '')}".strip()
            raise ValueError(f"image {i}: RAM++ expects an HxWx3 uint8 RGB array, got {desc}")
        if img.shape[0] == 0 or img.shape[1] == 0:
            raise ValueError(f"image {i}: empty image of shape {img.shape}")


def preprocess(images: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
    """``[N, 3, S, S]`` float32: bilinear resize to SxS (PIL, as the reference's torchvision transform does
    on PIL images), scale to [0, 1], ImageNet mean/std."""
    check_images(images)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    out = np.empty((len(images), 3, image_size, image_size), dtype=np.float32)
    for i, img in enumerate(images):
        resized = Image.fromarray(np.ascontiguousarray(img)).resize((image_size, image_size), Image.BILINEAR)
        arr = (np.asarray(resized, dtype=np.float32) / 255.0 - mean) / std
        out[i] = arr.transpose(2, 0, 1)
    return torch.from_numpy(out)


class RamPlus:
    """A loaded RAM++ tagger. Build it with ``load_ram_plus(spec)`` (or ``get_expert(spec, load_ram_plus)``)."""

    def __init__(self, model: RamPlusModel, tags: Sequence[str], thresholds: Sequence[float], *, name: str,
                 device: torch.device, dtype: torch.dtype) -> None:
        if len(tags) != model.config.num_tags or len(thresholds) != len(tags):
            raise ValueError(f"{len(tags)} tags / {len(thresholds)} thresholds for a model with "
                             f"{model.config.num_tags} tag queries")
        self.model = model
        self.tags: tuple[str, ...] = tuple(tags)
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        self.name = name
        self.device = device
        self.dtype = dtype

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    @torch.inference_mode()
    def scores(self, images: Sequence[np.ndarray], batch_size: int = 8) -> np.ndarray:
        """``[N, num_tags]`` float32 sigmoid scores, one row per image, columns in ``self.tags`` order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_images(images)
        rows = []
        for start in range(0, len(images), batch_size):
            batch = preprocess(images[start:start + batch_size], self.image_size)
            logits = self.model(batch.to(device=self.device, dtype=self.dtype))
            rows.append(torch.sigmoid(logits.float()).cpu().numpy())
        if not rows:
            return np.zeros((0, len(self.tags)), dtype=np.float32)
        return np.concatenate(rows, axis=0)

    def tag(self, images: Sequence[np.ndarray], batch_size: int = 8) -> list[list[TagScore]]:
        """Per image, the tags whose score exceeds that tag's threshold, highest score first."""
        results = []
        for row in self.scores(images, batch_size=batch_size):
            hits = np.flatnonzero(row > self.thresholds)
            hits = sorted(hits, key=lambda j: (-row[j], self.tags[j]))
            results.append([TagScore(self.tags[j], float(row[j])) for j in hits])
        return results
