"""RAM++ (Recognize Anything Plus) image tagger, implemented here as torch modules.

Construction (``model.py``, ``swin.py``), weight loading (``loading.py``) and inference (``inference.py``)
are separate. ``python -m experts.ram_plus --print-state-dict-shapes`` prints the released configuration's
state-dict names and shapes. Importing this package does not import torch; the heavy names load lazily.
"""
from __future__ import annotations

from typing import Any

from . import tiny as _tiny  # noqa: F401  registers tiny://ram_plus
from .spec import (
    DEFAULT_CHECKPOINT_FILE,
    DEFAULT_MODEL_ID,
    DEFAULT_TAG_THRESHOLD,
    TAG_LIST_FILE,
    TAG_THRESHOLD_FILE,
    TINY_MODEL_ID,
    RamPlusSpec,
    TagScore,
)

_LAZY = {
    "RamPlus": "inference",
    "preprocess": "inference",
    "RamPlusConfig": "model",
    "RamPlusModel": "model",
    "build_ram_plus_model": "model",
    "official_state_dict_shapes": "model",
    "state_dict_shapes": "model",
    "load_ram_plus": "loading",
    "load_vocabulary": "loading",
    "read_state_dict": "loading",
    "resolve_checkpoint": "loading",
    "CheckpointMismatchError": "loading",
    "VocabularyNotFoundError": "loading",
}

__all__ = [
    "DEFAULT_CHECKPOINT_FILE", "DEFAULT_MODEL_ID", "DEFAULT_TAG_THRESHOLD", "TAG_LIST_FILE", "TAG_THRESHOLD_FILE",
    "TINY_MODEL_ID", "RamPlusSpec", "TagScore", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
