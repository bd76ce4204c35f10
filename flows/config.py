"""The pipeline config: one frozen section per stage plus runtime settings, chosen by a profile.

Profiles (ARCHITECTURE rule 8): ``paper`` (the papers' models; the stage configs' own defaults), ``small``
(smallest real checkpoints, one GPU or a laptop), ``tiny`` (random-initialised miniatures, offline; outputs
are not meaningful). Each stage module may declare ``PROFILES = {"small": {...}, "tiny": {...}}`` with
overrides of its own config; a config file (YAML/JSON) and command-line values are merged on top.
The model is also the Prefect deployment's parameter schema, so the UI shows it as a form.
"""
from __future__ import annotations

import copy
import importlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from stages.registry import STAGE_MODULES, available_stages, get_stage

PROFILES = ("paper", "small", "tiny")


class RuntimeConfig(BaseModel):
    """How the flow runs, not what it computes (not part of any stage's config hash)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_runner: Literal["thread", "ray"] = "thread"
    max_workers: int = 4
    ray_address: str | None = None  # None: a local Ray instance; "ray://host:10001" for a cluster
    gpu_concurrency_limit: str | None = None  # a Prefect global concurrency limit holding one slot per GPU
    retries: int = 2
    retry_delay_s: float = 5.0
    # Shards one task run processes, one after another (each still its own table, marker and outcome): Prefect
    # costs tens of ms of CPU per task run, which matters where a shard's work is short (docs/cluster.md).
    shards_per_task: int = Field(1, ge=1)


class _PipelineBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    def stage_config(self, name: str):
        return getattr(self, name)


@lru_cache(maxsize=1)
def pipeline_model() -> type[_PipelineBase]:
    fields: dict[str, Any] = {
        "profile": (Literal["paper", "small", "tiny"], Field("paper", description="model profile")),
        "runtime": (RuntimeConfig, Field(default_factory=RuntimeConfig)),
    }
    for name in available_stages():
        cls = get_stage(name).config_cls
        fields[name] = (cls, Field(default_factory=cls, description=get_stage(name).description))
    return create_model("PipelineConfig", __base__=_PipelineBase, **fields)


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def profile_overrides(profile: str) -> dict:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {PROFILES}")
    out: dict = {}
    for name in available_stages():
        mod = importlib.import_module(STAGE_MODULES[name])
        section = getattr(mod, "PROFILES", {}).get(profile)
        if section:
            out[name] = section
    return out


def read_config_file(path: str | Path) -> dict:
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)


def load_pipeline_config(profile: str | None = None, config_file: str | Path | None = None,
                         overrides: dict | None = None, base: dict | None = None):
    """Profile defaults <- ``base`` (e.g. the config a root was made with) <- file <- overrides."""
    file_cfg = read_config_file(config_file) if config_file else {}
    profile = profile or (overrides or {}).get("profile") or file_cfg.get("profile") or (base or {}).get("profile") or "paper"
    data = deep_merge(profile_overrides(profile), base or {})
    data = deep_merge(data, file_cfg)
    data = deep_merge(data, overrides or {})
    data["profile"] = profile
    return pipeline_model().model_validate(data)
