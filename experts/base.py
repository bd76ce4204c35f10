"""Shared expert plumbing: model specs, device/dtype resolution, weight resolution, process-wide cache.

Every expert module follows the same three steps (STYLE.md, sam2 row):

* construction  -- ``build_*`` makes the torch module from a config, no weights;
* loading       -- ``load(spec)`` resolves weights (local path, Hugging Face id + revision, or ``tiny://``)
                   and moves the module to the spec's device and dtype;
* inference     -- methods under ``torch.inference_mode()`` over plain Python / numpy / PIL values.

Experts never touch Parquet, output roots or Prefect. ``get_expert`` keeps one instance per spec per
worker process, so a Ray or Prefect worker that runs many shards loads each model once.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

Device = Literal["auto", "cuda", "cpu", "mps"]
DType = Literal["auto", "bf16", "fp16", "fp32"]

TINY_SCHEME = "tiny://"


class WeightsNotFoundError(RuntimeError):
    """Raised when a checkpoint is neither a local path nor in the Hugging Face cache."""


class ModelSpec(BaseModel):
    """What to load and where. Hashable and frozen, so it keys the per-process cache.

    ``model_id`` is a Hugging Face id (``IDEA-Research/grounding-dino-base``), a local directory or file,
    or ``tiny://<family>`` for the random-initialised miniature used by the ``tiny`` profile.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model_id: str
    revision: str | None = None
    device: Device = "auto"
    dtype: DType = "auto"

    @property
    def is_tiny(self) -> bool:
        return self.model_id.startswith(TINY_SCHEME)

    def cache_key(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}:{self.model_dump_json()}"


def resolve_device(device: str = "auto"):
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device; use device='auto' or 'cpu'")
    return torch.device(device)


def resolve_dtype(dtype: str, device) -> "Any":
    """``auto`` means bf16 on CUDA (fp16 where bf16 is unsupported) and fp32 on CPU."""
    import torch

    if dtype == "auto":
        if getattr(device, "type", str(device)) == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def tiny_cache_dir() -> Path:
    root = os.environ.get("MOTIONFORGE_TINY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "motionforge", "tiny"
    )
    return Path(root)


_TINY_BUILDERS: dict[str, Callable[[Path], None]] = {}


def register_tiny(family: str) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    """Register ``fn(out_dir)`` that writes a random-initialised miniature checkpoint for ``family``."""

    def deco(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        _TINY_BUILDERS[family] = fn
        return fn

    return deco


_TINY_MODULES = {
    # family -> module that registers its builder on import
    "grounding_dino": "experts.grounding_dino",
    "clip": "experts.clip",
    "ram_plus": "experts.ram_plus",
    "sam2": "experts.samurai",
    "qwen2_vl": "experts.vlm",
    "qwen2_5_vl": "experts.vlm",
    "qwen2_lm": "experts.llm",
    "internvl": "experts.vlm",
}

_tiny_lock = threading.Lock()


def resolve_tiny(model_id: str) -> Path:
    """Build (once, cached on disk) and return the local path of a ``tiny://family`` checkpoint."""
    import importlib

    family = model_id[len(TINY_SCHEME):].strip("/")
    if family not in _TINY_BUILDERS and family in _TINY_MODULES:
        importlib.import_module(_TINY_MODULES[family])
    if family not in _TINY_BUILDERS:
        raise WeightsNotFoundError(f"no tiny builder for {model_id!r}; known: {sorted(_TINY_BUILDERS) or sorted(_TINY_MODULES)}")
    out = tiny_cache_dir() / family
    if (out / ".complete").exists():
        return out
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    # threads of this process, and other processes sharing the cache (parallel tests, workers on one node): one
    # builds, the others wait and then find it complete; a folder being read is never replaced
    with _tiny_lock, FileLock(str(out.with_name(f".{family}.lock"))):
        if not (out / ".complete").exists():
            tmp = out.with_name(f".{family}.tmp-{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            _TINY_BUILDERS[family](tmp)
            (tmp / ".complete").write_text("ok")
            if out.exists():  # an incomplete build left by a killed process
                import shutil

                shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    return out


def missing_weights_message(model_id: str, revision: str | None = None) -> str:
    rev = f" (revision {revision})" if revision else ""
    return (
        f"weights for {model_id}{rev} not found locally and the hub is unreachable or refused; "
        f"pass a local checkpoint path as the model id, point HF_HOME at a cache that has them "
        f"(or set MOTIONFORGE_WEIGHTS), or run with --profile tiny"
    )


def resolve_local(model_id: str, revision: str | None = None) -> str:
    """Return something ``from_pretrained``/``torch.load`` can open without further downloads if possible.

    Order: ``tiny://`` builder; an existing local path; ``$MOTIONFORGE_WEIGHTS/<model_id>``; otherwise the
    Hugging Face id itself (``from_pretrained`` then uses the HF cache and, if allowed, the hub).
    """
    if model_id.startswith(TINY_SCHEME):
        return str(resolve_tiny(model_id))
    p = Path(os.path.expanduser(model_id))
    if p.exists():
        return str(p)
    root = os.environ.get("MOTIONFORGE_WEIGHTS")
    if root and (Path(root) / model_id).exists():
        return str(Path(root) / model_id)
    if model_id.startswith(("/", "./", "../", "~")):
        raise WeightsNotFoundError(f"local checkpoint path {model_id} does not exist")
    return model_id


def hf_load(loader: Callable[..., Any], model_id: str, revision: str | None = None, **kwargs: Any) -> Any:
    """Call a ``from_pretrained``-style loader, turning hub/cache failures into one clear error."""
    src = resolve_local(model_id, revision)
    try:
        return loader(src, revision=revision if src == model_id else None, **kwargs)
    except (OSError, ValueError) as exc:  # transformers raises OSError for missing repos / offline cache
        if src != model_id:
            raise
        raise WeightsNotFoundError(missing_weights_message(model_id, revision) + f" [{type(exc).__name__}]") from exc


def inference_mode(fn):
    """Run ``fn`` under ``torch.inference_mode()``; torch is imported lazily so expert modules import cheaply."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper


T = TypeVar("T")
_CACHE: dict[str, Any] = {}
_CACHE_LOCK = threading.Lock()
_KEY_LOCKS: dict[str, threading.RLock] = {}


def get_expert(spec: ModelSpec, loader: Callable[[Any], T], extra_key: str = "") -> T:
    """Return the process-wide instance for ``spec``, loading it on first use (thread-safe).

    ``extra_key`` separates instances that differ in something outside the spec (e.g. the response cache
    an API client writes to)."""
    key = spec.cache_key() + ("|" + extra_key if extra_key else "")
    inst = _CACHE.get(key)
    if inst is not None:
        return inst
    # One lock per key: different models load in parallel, and a loader may itself call get_expert
    # (e.g. a VLM wrapper sharing weights between specs) without deadlocking.
    with _CACHE_LOCK:
        lock = _KEY_LOCKS.setdefault(key, threading.RLock())
    with lock:
        inst = _CACHE.get(key)
        if inst is None:
            inst = loader(spec)
            _CACHE[key] = inst
    return inst


def drop_expert(spec: ModelSpec, instance: Any, extra_key: str = "") -> bool:
    """Forget ``instance`` as the process-wide one for ``spec`` if it still is, so the next :func:`get_expert`
    loads anew: for an instance that can no longer serve (a vLLM engine whose process died). True if dropped."""
    key = spec.cache_key() + ("|" + extra_key if extra_key else "")
    with _CACHE_LOCK:
        if _CACHE.get(key) is instance:
            del _CACHE[key]
            return True
    return False


def loaded_experts() -> list[str]:
    return sorted(_CACHE)


def clear_expert_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()
