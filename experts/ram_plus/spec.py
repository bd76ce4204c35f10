"""What to load (``RamPlusSpec``) and what a tag prediction is (``TagScore``). Importing this needs no torch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import model_validator

from experts.base import TINY_SCHEME, DType, ModelSpec

DEFAULT_MODEL_ID = "xinyu1205/recognize-anything-plus-model"
DEFAULT_CHECKPOINT_FILE = "ram_plus_swin_large_14m.pth"
TINY_MODEL_ID = f"{TINY_SCHEME}ram_plus"

# Vocabulary files, read from ``vocab_dir``, else from beside the checkpoint, else from the copy of the
# released files shipped in ``experts/ram_plus/data/``; names as in the reference release's
# ``ram/data/`` folder. The tag list: UTF-8, one tag per line, in label_embed order (4,585 lines for the
# released model). The thresholds: one decimal number per line, same order; tags past its end, or all
# tags when the file is absent, use DEFAULT_TAG_THRESHOLD.
TAG_LIST_FILE = "ram_tag_list.txt"
TAG_THRESHOLD_FILE = "ram_tag_list_threshold.txt"
DEFAULT_TAG_THRESHOLD = 0.68


@dataclass(frozen=True)
class TagScore:
    """One recognised tag and its sigmoid score (above that tag's threshold)."""

    tag: str
    score: float


class RamPlusSpec(ModelSpec):
    """A RAM++ checkpoint and how to run it.

    ``model_id``: a Hugging Face repo id (the checkpoint file ``checkpoint_file`` inside it), a local ``.pth``
    file, a local directory holding ``checkpoint_file`` (or exactly one ``.pth``), or ``tiny://ram_plus``.
    ``vocab_dir``: where ``ram_tag_list.txt`` / ``ram_tag_list_threshold.txt`` are; default: the checkpoint's
    directory when it holds a tag list, else the released 4,585-tag vocabulary shipped with the package.
    ``variant`` and ``image_size`` pick the architecture; ``tiny://`` ids default to ``variant="tiny"``, and
    ``variant="tiny"`` defaults to ``image_size=64``.
    """

    model_id: str = DEFAULT_MODEL_ID
    checkpoint_file: str = DEFAULT_CHECKPOINT_FILE
    vocab_dir: str | None = None
    variant: Literal["swin_l", "swin_b", "tiny"] = "swin_l"
    image_size: int = 384
    # fp32 by default, unlike most experts: the per-tag thresholds were calibrated on fp32 scores, and with
    # bf16 scores move by up to a few hundredths (measured on an H100), enough to flip borderline tags.
    # The model is small (1.3 GB), so fp32 costs little; pass dtype="bf16" for speed (about 1.5x).
    dtype: DType = "fp32"

    @model_validator(mode="before")
    @classmethod
    def _tiny_defaults(cls, data: Any) -> Any:
        # tiny:// ids mean the miniature; the miniature's input size is 64 px unless said otherwise.
        if isinstance(data, dict):
            data = dict(data)
            if str(data.get("model_id", "")).startswith(TINY_SCHEME):
                data.setdefault("variant", "tiny")
            if data.get("variant") == "tiny":
                data.setdefault("image_size", 64)
        return data
