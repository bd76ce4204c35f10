"""A test-only stage that takes a while per item, and a script entry that runs it (killed by tests)."""
from __future__ import annotations

import dataclasses
import sys
import time

import pyarrow as pa

from schemas._base import Record, record_schema
from stages.base import Stage, StageConfig
from stages.runner import run_shard
from storage.manifest import record_plan
from storage.root import OutputRoot

SCHEMA = record_schema([pa.field("item", pa.string(), nullable=False), pa.field("value", pa.int64(), nullable=False)],
                       name="slow")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SlowRow(Record):
    item: str
    value: int


class SlowConfig(StageConfig):
    delay_s: float = 0.0
    multiplier: int = 3


def process(ctx):
    from storage.manifest import read_plan

    items = read_plan(ctx.root)["shards"][ctx.shard]
    out = []
    for it in items:
        time.sleep(ctx.config.delay_s)
        n = int(it.rsplit("-", 1)[1])
        if n % 7 == 3:
            out.append(SlowRow(item=it, value=-1, status="error", error=f"item {it} is unlucky"))
        else:
            out.append(SlowRow(item=it, value=n * ctx.config.multiplier))
    return out


STAGE = Stage(name="slow", schema=SCHEMA, inputs=(), config_cls=SlowConfig, process=process)


def plan(root: OutputRoot, n_items: int, shard_size: int) -> int:
    items = [f"item-{i}" for i in range(n_items)]
    shards = [items[i:i + shard_size] for i in range(0, n_items, shard_size)]
    record_plan(root, {"version": 1, "shard_size": shard_size, "shards": shards})
    return len(shards)


def run_all(out: str, delay_s: float) -> None:
    from storage.manifest import read_plan

    root = OutputRoot(out)
    cfg = SlowConfig(delay_s=delay_s)
    for k in range(len(read_plan(root)["shards"])):
        run_shard(STAGE, root, cfg, k)


if __name__ == "__main__":
    run_all(sys.argv[1], float(sys.argv[2]))
