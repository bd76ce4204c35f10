"""The root's manifest: which config each stage last ran with, and the input plan.

Staleness is derived, not stored: a shard is *stale* when its marker was written under another config
hash than the stage's current one, or when an input shard it was built from has been rewritten since
(its fingerprint changed). So changing ``scenes``' config and re-running ``scenes`` makes every ``tag``
shard stale until ``tag`` runs again, and ``status`` says so.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import threading
from typing import Any

from storage.root import OutputRoot

MANIFEST = "_manifest.json"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def read_manifest(root: OutputRoot) -> dict[str, Any]:
    return root.read_json(root.path(MANIFEST), default=None) or {"version": 1, "stages": {}}


def record_stage_config(root: OutputRoot, stage: str, config_hash: str, config: dict, inputs: list[str]) -> bool:
    """Store the stage's config; returns True when it changed (downstream shards then show as stale)."""
    m = read_manifest(root)
    prev = m["stages"].get(stage, {})
    changed = prev.get("config_hash") not in (None, config_hash)
    m["stages"][stage] = {
        "config_hash": config_hash,
        "config": config,
        "inputs": inputs,
        "updated_at": _now(),
        "previous_config_hash": prev.get("config_hash") if changed else prev.get("previous_config_hash"),
    }
    root.write_json(root.path(MANIFEST), m)
    return changed


def stage_config_hash(root: OutputRoot, stage: str) -> str | None:
    return read_manifest(root)["stages"].get(stage, {}).get("config_hash")


def record_plan(root: OutputRoot, plan: dict) -> None:
    root.write_json(root.path("ingest", "_plan.json"), plan)


def read_plan(root: OutputRoot) -> dict | None:
    return root.read_json(root.path("ingest", "_plan.json"))


_PLAN_CACHE: dict[str, tuple[tuple, dict]] = {}
_PLAN_LOCK = threading.Lock()
_PINNED = threading.local()  # .plans: root url -> plan, while a reader holds `pinned_plan`


@contextlib.contextmanager
def pinned_plan(root: OutputRoot):
    """Within the block, this thread's ``cached_plan(root)`` answers from one snapshot taken on entry instead
    of checking the file's modification time on every call: a read-only pass over many shards (``status``
    judges 10,000 shards, each asking for the plan several times) then stats the plan once, not per shard."""
    plans = getattr(_PINNED, "plans", None)
    if plans is None:
        plans = _PINNED.plans = {}
    outer = root.url in plans
    if not outer:
        plans[root.url] = cached_plan(root)
    try:
        yield plans[root.url]
    finally:
        if not outer:
            plans.pop(root.url, None)


def cached_plan(root: OutputRoot) -> dict | None:
    """The plan, parsed once per process while the file is unchanged (same modification time and size).

    Every ingest shard and every staleness check needs it; re-reading the whole plan each time made the
    work per run grow with shards x plan size. The returned dict is shared: callers must not modify it."""
    import pyarrow.fs as pafs

    plans = getattr(_PINNED, "plans", None)
    if plans and root.url in plans:
        return plans[root.url]
    path = root.path("ingest", "_plan.json")
    info = root.fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    stamp = (info.mtime_ns, info.size)
    key = root.url
    with _PLAN_LOCK:
        hit = _PLAN_CACHE.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    plan = read_plan(root)
    if plan is not None:
        with _PLAN_LOCK:
            _PLAN_CACHE[key] = (stamp, plan)
    return plan
