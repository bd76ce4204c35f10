"""The stage contract.

A stage module declares a frozen config (:class:`StageConfig`), pure functions over plain values, and one
``STAGE = Stage(...)`` that names its inputs, output schema, resources and ``process`` entry point::

    def process(ctx: ShardContext) -> Iterable[Record]:
        clips = ctx.read_records("clips", Clip)                  # the input shard, ok rows only
        detector = ctx.expert("detect.detector", lambda: load_grounding_dino(ctx.config.detector))
        return [...]                                             # one row per item; failures are rows

The runner (:mod:`stages.runner`) does everything else: skip-completed, atomic write, markers, provenance.
Stages never choose a device (the expert spec in the config does) and never see Prefect.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from typing import Any, Callable, ClassVar, Iterable, Literal, TypeVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from schemas._base import STATUS_OK, Record, from_table
from storage.root import OutputRoot

T = TypeVar("T")
R = TypeVar("R", bound=Record)


# The protocol between a stage's config hash and the expert specs inside its config (experts do not import stages,
# so experts/openai_compat.py spells the same two values): the dump's context, and the value of a key to leave out.
CONFIG_HASH_CONTEXT = "config_hash"
NOT_HASHED = "<not hashed>"


def _without_unhashed(data: Any) -> Any:
    """``data`` (a JSON dump) less every mapping entry whose value is NOT_HASHED, at any depth."""
    if isinstance(data, dict):
        return {k: _without_unhashed(v) for k, v in data.items() if v != NOT_HASHED}
    if isinstance(data, list):
        return [_without_unhashed(v) for v in data]
    return data


class StageConfig(BaseModel):
    """Base of every stage config: frozen, no unknown keys, hashed for provenance and staleness."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())
    # Fields that change how fast a stage runs, never what it writes (prefetch depth, how many items share a
    # model call): left out of the hash, so tuning them does not make finished shards stale.
    RUN_ONLY_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def config_hash(self) -> str:
        # Asked once per (stage, shard) by the runner and by a flow's check of finished shards, of the same
        # config object: about 60 us a time (a JSON dump of the whole config), so it is kept per object. The
        # model is frozen; the cache holds the object, so its id is not reused while the entry lives.
        hit = _CONFIG_HASHES.get(id(self))
        if hit is not None and hit[0] is self:
            return hit[1]
        # the context lets nested expert specs mark their own run-only parts as NOT_HASHED (ChatSpec's vLLM
        # engine options): those keys are left out
        data = self.model_dump(mode="json", exclude=set(self.RUN_ONLY_FIELDS), context={CONFIG_HASH_CONTEXT: True})
        blob = json.dumps(_without_unhashed(data), sort_keys=True, separators=(",", ":"))
        value = hashlib.sha256(blob.encode()).hexdigest()[:16]
        if len(_CONFIG_HASHES) >= 256:
            _CONFIG_HASHES.clear()
        _CONFIG_HASHES[id(self)] = (self, value)
        return value


_CONFIG_HASHES: dict[int, tuple[StageConfig, str]] = {}  # id(config) -> (config, its hash)


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one (stage, shard) task needs; flows turn it into Ray requests and GPU concurrency slots."""

    cpus: float = 1.0
    gpus: float = 0.0

    @property
    def uses_gpu(self) -> bool:
        return self.gpus > 0


def chat_expert_name(kind: str, spec: Any) -> str:
    """Provenance of one chat model: "<kind>:<backend>:<model id>" ("vlm:openai:gpt-4o", "llm:vllm:Qwen/...");
    the backend is named because the same weights decode differently in-process, on vLLM or behind an endpoint."""
    return f"{kind}:{spec.backend}:{spec.model_id}"


def vlm_expert_name(cfg: Any) -> tuple[str, str | None]:
    """Provenance of a stage whose config carries one ``vlm`` spec: ("vlm:<backend>:<model id>", revision)."""
    return (chat_expert_name("vlm", cfg.vlm), cfg.vlm.revision)


def chat_resources(gpu: "Resources", *specs: Any) -> "Resources":
    """A VLM/LLM stage needs its GPU only when a model runs in-process; endpoint calls need one CPU."""
    if specs and all(getattr(s, "backend", "transformers") == "openai" for s in specs):
        return Resources(cpus=1, gpus=0)
    return gpu


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    schema: pa.Schema
    inputs: tuple[str, ...]
    config_cls: type[StageConfig]
    process: Callable[["ShardContext"], Iterable[Record]]
    expert: Callable[[Any], tuple[str, str | None]] = lambda cfg: ("none", None)
    resources: Resources = Resources()
    scope: Literal["shard", "global"] = "shard"
    branch: Literal["common", "imove_it", "motionbench"] = "common"
    description: str = ""
    # Inputs that live outside stage tables (e.g. imported human decisions): (root, shard) -> {name: digest}.
    # The runner adds them to the shard's input fingerprints, so changing them makes the shard stale.
    external_inputs: Callable[[OutputRoot, int], dict[str, str]] | None = None
    # The same for many shards at once, when the stage can answer them together (`status` asks for every shard:
    # one listing instead of one per shard); must equal [external_inputs(root, k) for k in shards].
    external_inputs_of: Callable[[OutputRoot, list[int]], list[dict[str, str]]] | None = None
    # Resources that depend on the config (e.g. a VLM stage needs no GPU when it calls an HTTP endpoint).
    resources_fn: Callable[[Any], Resources] | None = None

    def resources_for(self, config: Any) -> Resources:
        return self.resources_fn(config) if self.resources_fn is not None else self.resources


# Test doubles and notebooks can put a ready expert in place of the loaded one, process-wide, by name.
_OVERRIDES: dict[str, Any] = {}
_OVERRIDES_LOCK = threading.Lock()


def install_expert_override(name: str, expert: Any) -> None:
    with _OVERRIDES_LOCK:
        _OVERRIDES[name] = expert


def clear_expert_overrides() -> None:
    with _OVERRIDES_LOCK:
        _OVERRIDES.clear()


@dataclasses.dataclass
class ShardContext:
    stage: Stage
    root: OutputRoot
    config: Any
    shard: int
    input_shards: tuple[int, ...]  # (shard,) for shard-scoped stages; every shard for global ones
    pipeline: dict[str, Any] = dataclasses.field(default_factory=dict)  # other stages' configs, read-only
    progress: Callable[[int, int], None] = lambda done, total: None

    def read(self, stage: str) -> pa.Table:
        tables = [self.root.read_shard(stage, s) for s in self.input_shards]
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    def read_records(self, stage: str, cls: type[R], only_ok: bool = True) -> list[R]:
        rows = from_table(self.read(stage), cls)
        return [r for r in rows if r.status == STATUS_OK] if only_ok else rows

    def expert(self, name: str, factory: Callable[[], T]) -> T:
        """The expert called ``name``: an installed override if any, else ``factory()`` (cached per process
        by :func:`experts.base.get_expert` inside the factory)."""
        with _OVERRIDES_LOCK:
            if name in _OVERRIDES:
                return _OVERRIDES[name]
        return factory()

    def chat_expert(self, name: str, spec: Any, loader: Callable[..., T]) -> T:
        """A VLM/LLM expert: an installed override, else the per-process instance for (spec, this root),
        built as ``loader(spec, cache=<this root's response cache>)``."""
        from experts.base import get_expert

        return self.expert(name, lambda: get_expert(spec, lambda s: loader(s, cache=self.response_cache()),
                                                    extra_key=self.root.url))

    def media_dir(self, *parts: str) -> str:
        return self.root.media_dir(self.stage.name, *parts)

    def response_cache(self):
        from storage.response_cache import ResponseCache

        return ResponseCache(self.root.url)
