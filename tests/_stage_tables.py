"""Write rows as if an upstream stage had produced them (table + marker), for testing one stage alone."""
from __future__ import annotations

import importlib

import pyarrow as pa

from stages.base import Stage, StageConfig
from stages.runner import run_shard
from storage.root import OutputRoot


class _Cfg(StageConfig):
    tag: str = "fixture"


def write_stage(root: OutputRoot, name: str, shard: int, rows: list, schema: pa.Schema | None = None) -> None:
    """Run a stand-in for stage ``name`` that returns ``rows``: same schema check, table and marker."""
    if schema is None:
        schema = importlib.import_module(type(rows[0]).__module__).SCHEMA
    fake = Stage(name=name, schema=schema, inputs=(), config_cls=_Cfg, process=lambda ctx: rows)
    plan = root.read_json(root.path("ingest", "_plan.json"))
    if plan is None or len(plan["shards"]) <= shard:
        shards = (plan or {"shards": []})["shards"]
        shards += [[f"fixture-{i}"] for i in range(len(shards), shard + 1)]
        root.write_json(root.path("ingest", "_plan.json"), {"version": 1, "shard_size": 1, "shards": shards})
    run_shard(fake, root, _Cfg(), shard, force=True)
