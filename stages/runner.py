"""Runs one (stage, shard): skip if complete and fresh, else process, validate, write atomically, mark.

Crash safety: the Parquet file is renamed into place only when complete, and the marker is written after
it. A shard without a marker is not complete, so a resumed run recomputes it and overwrites any earlier
file: nothing is lost and nothing is duplicated.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import hashlib
import json
import time
import uuid
from typing import Any, Callable

from schemas._base import STATUS_ERROR, STATUS_OK, STATUS_SKIPPED, to_table
from stages.base import ShardContext, Stage
from stages.shared.reasons import normalise_reason
from storage.manifest import cached_plan, stage_config_hash
from storage.memory import release_freed_memory
from storage.root import OutputRoot


class InputsNotReadyError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class ShardOutcome:
    stage: str
    shard: int
    action: str  # "written" | "skipped-complete"
    rows: int
    ok: int
    error: int
    skipped: int
    seconds: float
    top_errors: tuple[tuple[str, int], ...]

    def as_dict(self) -> dict[str, Any]:
        # the fields one by one: dataclasses.asdict deep-copies each (50 us an outcome, and a resumed run makes
        # one per finished shard)
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["top_errors"] = [list(x) for x in self.top_errors]
        return d


def plan_shards(root: OutputRoot) -> list[int]:
    plan = cached_plan(root)
    if not plan:
        raise InputsNotReadyError(f"{root.url} has no ingest plan; run `motionforge run --input ... --out {root.url}` first")
    return list(range(len(plan["shards"])))


_PLAN_FPS: dict[int, tuple[dict, dict[int, str]]] = {}  # id(cached plan) -> (plan, shard -> fingerprint)


def plan_fingerprint(root: OutputRoot, shard: int) -> str:
    plan = cached_plan(root) or {"shards": []}
    if shard >= len(plan["shards"]):
        raise InputsNotReadyError(f"shard {shard} is not in the ingest plan of {root.url} ({len(plan['shards'])} shards)")
    hit = _PLAN_FPS.get(id(plan))
    if hit is None or hit[0] is not plan:
        if len(_PLAN_FPS) > 8:
            _PLAN_FPS.clear()
        hit = _PLAN_FPS[id(plan)] = (plan, {})
    fp = hit[1].get(shard)
    if fp is None:
        blob = json.dumps(plan["shards"][shard], sort_keys=True)
        fp = hit[1][shard] = "plan-" + hashlib.sha256(blob.encode()).hexdigest()[:16]
    return fp


MarkerReader = Callable[[str, int], "dict | None"]


def input_fingerprints(stage: Stage, root: OutputRoot, shard: int, read_marker: MarkerReader | None = None) -> dict[str, str]:
    """What this shard was (or would be) built from: the input shards' write fingerprints.
    ``read_marker(stage, shard)`` replaces ``root.read_marker`` (``status`` passes a memo that reads each once)."""
    read_marker = read_marker or root.read_marker
    if not stage.inputs:
        return {"plan": plan_fingerprint(root, shard) if stage.name == "ingest" else "none"}
    shards = plan_shards(root) if stage.scope == "global" else [shard]
    out = {}
    for inp in stage.inputs:
        fps = []
        for s in shards:
            m = read_marker(inp, s)
            if m is None:
                raise InputsNotReadyError(
                    f"stage {stage.name!r} shard {shard}: input {inp!r} shard {s} is not complete; run {inp!r} first"
                )
            fps.append(m["fingerprint"])
        out[inp] = fps[0] if len(fps) == 1 else "all-" + hashlib.sha256("|".join(fps).encode()).hexdigest()[:16]
    if stage.external_inputs is not None:
        out.update(stage.external_inputs(root, shard))
    return out


def _registered(name: str) -> Stage | None:
    from stages.registry import UnknownStageError, get_stage

    try:
        return get_stage(name)
    except UnknownStageError:
        return None


def shard_state(stage: Stage, root: OutputRoot, shard: int, config_hash: str | None = None,
                read_marker: MarkerReader | None = None, *, lookup: Callable[[str], Stage | None] | None = None,
                memo: dict | None = None) -> str:
    """complete | stale | pending.

    *stale* is transitive: a shard is stale when its marker was written under another config, when an input
    shard it was built from has been rewritten since, or when any shard it was built from, directly or further
    up, is itself stale or gone. Upstream shards are judged from their own markers (what each was built from,
    as recorded when it was written); ``lookup`` finds a stage by name for its external inputs (default: the
    stage registry). ``memo`` may be shared across calls (``status`` does) so each upstream shard is judged once;
    ``read_marker(stage, shard)`` replaces ``root.read_marker`` (``status`` passes one that reads each marker once).
    """
    memo = {} if memo is None else memo
    read_marker = read_marker or root.read_marker
    m = read_marker(stage.name, shard)
    if m is None:
        return "pending"
    current = config_hash or stage_config_hash(root, stage.name) or m["config_hash"]
    if m["config_hash"] != current:
        return "stale"
    try:
        if input_fingerprints(stage, root, shard, read_marker) != m["inputs"]:
            return "stale"
    except InputsNotReadyError:
        return "stale"
    upstream = plan_shards(root) if stage.scope == "global" and stage.inputs else [shard]
    for inp in stage.inputs:
        if not all(_upstream_fresh(root, inp, k, lookup or _registered, memo, read_marker) for k in upstream):
            return "stale"
    return "complete"


def _upstream_fresh(root: OutputRoot, name: str, shard: int, lookup, memo: dict, read_marker: MarkerReader) -> bool:
    key = (name, shard)
    if key not in memo:
        memo[key] = True  # a cycle (none in a valid DAG) must not recurse forever
        m = read_marker(name, shard)
        memo[key] = m is not None and _built_from_current(root, name, shard, m, lookup, memo, read_marker)
    return memo[key]


def _built_from_current(root: OutputRoot, name: str, shard: int, m: dict, lookup, memo: dict,
                        read_marker: MarkerReader) -> bool:
    """Whether the shard ``m`` marks still matches its stage's config and everything it was built from."""
    if "manifest" not in memo:
        from storage.manifest import read_manifest

        memo["manifest"] = read_manifest(root)
    current = memo["manifest"]["stages"].get(name, {}).get("config_hash")
    if current and m["config_hash"] != current:
        return False
    external: dict | None = None
    for inp, recorded in (m.get("inputs") or {}).items():
        if inp == "plan":
            try:
                if recorded != "none" and recorded != plan_fingerprint(root, shard):
                    return False
            except InputsNotReadyError:
                return False
            continue
        is_stage = memo.get(("is-stage", inp))
        if is_stage is None:  # asked once per pass, not per shard (a filesystem stat each)
            is_stage = memo[("is-stage", inp)] = root.exists(root.path(inp, "_markers"))
        if not is_stage:  # not a stage: an external input of this stage
            if external is None:
                st = lookup(name)
                external = st.external_inputs(root, shard) if st is not None and st.external_inputs else {}
            if inp in external and external[inp] != recorded:
                return False
            continue
        shards = plan_shards(root) if str(recorded).startswith("all-") else [shard]
        fps = []
        for k in shards:
            im = read_marker(inp, k)
            if im is None:
                return False
            fps.append(im["fingerprint"])
        now = fps[0] if len(fps) == 1 else "all-" + hashlib.sha256("|".join(fps).encode()).hexdigest()[:16]
        if now != recorded or not all(_upstream_fresh(root, inp, k, lookup, memo, read_marker) for k in shards):
            return False
    return True


def _summarise(rows) -> tuple[int, int, int, tuple[tuple[str, int], ...]]:
    counts = collections.Counter(r.status for r in rows)
    # grouped by cause (ids and numbers masked), each shown as its first message: five "qgen for clip <id>:
    # reply is not valid JSON" rows are one reason x5, not five reasons x1
    errs: collections.Counter = collections.Counter()
    example: dict[str, str] = {}
    for r in rows:
        if r.status == STATUS_ERROR:
            msg = (r.error or "").split("\n")[0][:200]
            cause = normalise_reason(msg)
            errs[cause] += 1
            example.setdefault(cause, msg)
    top = tuple((example[c], n) for c, n in errs.most_common(5))
    return counts[STATUS_OK], counts[STATUS_ERROR], counts[STATUS_SKIPPED], top


def _complete(stage: Stage, root: OutputRoot, chash: str, shard: int, inputs: dict, marker: dict | None,
              t0: float) -> ShardOutcome | None:
    if (marker is None or marker["config_hash"] != chash or marker["inputs"] != inputs
            or not root.exists(root.shard_file(stage.name, shard))):
        return None
    return ShardOutcome(stage.name, shard, "skipped-complete", marker["rows"], marker["ok"], marker["error"],
                        marker["skipped"], time.perf_counter() - t0,
                        tuple(tuple(x) for x in marker.get("top_errors", [])))


def complete_outcome(stage: Stage, root: OutputRoot, config: Any, shard: int) -> ShardOutcome | None:
    """What :func:`run_shard` (without ``force``) would return for ``shard`` without doing any work: the
    "skipped-complete" outcome when its table and marker are there, written under ``config`` from its input
    shards as they are now; else None. Raises :class:`InputsNotReadyError` when an input shard is not complete.
    The flow asks this before it makes a task run for a shard (``flows.pipeline``), with the same rule."""
    t0 = time.perf_counter()
    inputs = input_fingerprints(stage, root, shard)
    return _complete(stage, root, config.config_hash(), shard, inputs, root.read_marker(stage.name, shard), t0)


def run_shard(
    stage: Stage,
    root: OutputRoot,
    config: Any,
    shard: int,
    *,
    force: bool = False,
    pipeline: dict[str, Any] | None = None,
    progress=None,
) -> ShardOutcome:
    t0 = time.perf_counter()
    chash = config.config_hash()
    inputs = input_fingerprints(stage, root, shard)
    marker = root.read_marker(stage.name, shard)
    if not force and (done := _complete(stage, root, chash, shard, inputs, marker, t0)) is not None:
        return done
    if marker is not None:
        # The old marker goes first: a crash between here and the new marker leaves the shard pending, never
        # "complete" with a half-replaced table.
        root.delete_marker(stage.name, shard)
    ctx = ShardContext(
        stage=stage, root=root, config=config, shard=shard,
        input_shards=tuple(plan_shards(root)) if stage.scope == "global" else (shard,),
        pipeline=pipeline or {}, progress=progress or (lambda done, total: None),
    )
    failed_file = root.path(stage.name, "_failed", f"shard-{shard:05d}.json")
    try:
        rows = list(stage.process(ctx))
    except BaseException as exc:
        # Whole-shard failure: raise (the flow retries it) but leave a note that `status` can show.
        root.write_json(failed_file, {"stage": stage.name, "shard": shard, "error": f"{type(exc).__name__}: {exc}"[:2000],
                                      "at": dt.datetime.now(dt.timezone.utc).isoformat()})
        raise
    expert_name, expert_rev = stage.expert(config)
    now = dt.datetime.now(dt.timezone.utc)
    rows = [
        dataclasses.replace(
            r, stage=stage.name, expert=r.expert or expert_name, expert_revision=r.expert_revision or expert_rev,
            config_hash=chash, created_at=now,
        )
        for r in rows
    ]
    table = to_table(rows, stage.schema)
    root.write_table_atomic(stage.name, shard, table)
    ok, err, skipped, top = _summarise(rows)
    seconds = time.perf_counter() - t0
    root.write_marker(stage.name, shard, {
        "stage": stage.name, "shard": shard, "config_hash": chash, "inputs": inputs,
        "fingerprint": uuid.uuid4().hex, "rows": len(rows), "ok": ok, "error": err, "skipped": skipped,
        "top_errors": [list(x) for x in top], "seconds": round(seconds, 3), "created_at": now.isoformat(),
    })
    if root.exists(failed_file):
        root.delete(failed_file)
    n_rows = len(rows)
    del rows, table  # before the trim, so that their memory is free to hand back
    release_freed_memory()
    return ShardOutcome(stage.name, shard, "written", n_rows, ok, err, skipped, seconds, top)
