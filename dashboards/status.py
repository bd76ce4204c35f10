"""Per-stage status of an output root, read from markers, manifest and tables (read-only)."""
from __future__ import annotations

import collections
import sys
from typing import Any

from stages.registry import STAGE_MODULES, get_stage
from stages.runner import plan_shards, shard_state
from stages.shared.reasons import normalise_reason
from storage.manifest import pinned_plan, read_manifest
from storage.root import OutputRoot


def root_status(out: str, max_errors: int = 5, stages: dict | None = None) -> dict[str, Any]:
    """``stages``: name -> Stage to report on (default: every registered stage present under ``out``)."""
    root = OutputRoot(out)
    with pinned_plan(root):  # the plan is read once for the whole pass, not stat-ed per shard
        return _root_status(root, max_errors, stages)


def _root_status(root: OutputRoot, max_errors: int, stages: dict | None) -> dict[str, Any]:
    manifest = read_manifest(root)
    try:
        shards = plan_shards(root)
    except Exception:  # noqa: BLE001 -- no plan yet
        shards = []
    known = stages
    memo: dict = {}  # shard states shared across stages: staleness is transitive, so upstream ones are reused

    def lookup(name: str):
        if known is not None:
            return known.get(name)
        try:
            return get_stage(name)
        except Exception:  # noqa: BLE001 -- an unknown or unloadable stage is judged by fingerprints only
            return None

    report = []
    # Every marker is read at most once: the states of a stage's shards and of the shards downstream of it all
    # come from this memo (10,000 shards: 0.5-0.75 s in-process; benchmarks/bench_status.py).
    markers: dict[tuple[str, int], dict | None] = {}

    def read_marker(stage: str, shard: int) -> dict | None:
        key = (stage, shard)
        if key not in markers:
            markers[key] = _slim(root.read_marker(stage, shard))
        return markers[key]

    listed: dict[str, list[int]] = {}

    def completed(name: str) -> list[int]:  # each stage's marker folder listed once per pass (remote: many calls)
        if name not in listed:
            listed[name] = root.completed_shards(name)
        return listed[name]

    if not root.is_local:
        _prefetch_markers(root, {name: completed(name) for name in (known or STAGE_MODULES)}, markers)

    for name in (known or STAGE_MODULES):
        if name not in manifest["stages"] and not completed(name):
            continue
        try:
            st = known[name] if known else get_stage(name)
        except Exception:  # noqa: BLE001
            continue
        expected = [0] if st.scope == "global" else shards
        states = collections.Counter()
        stale_shards, pending = [], []
        chash = manifest["stages"].get(name, {}).get("config_hash")
        for k in expected:
            s = shard_state(st, root, k, config_hash=chash, read_marker=read_marker, lookup=lookup, memo=memo)
            if s != "stale" and (name, k) not in memo:
                # What a downstream shard asks of this one (runner._upstream_fresh) follows from its verdict: a
                # complete shard matches its config, the inputs it records and everything upstream, so it is fresh;
                # a pending one has no marker. Stages run in pipeline order, so most of those questions are
                # answered here instead of by a second pass over the marker (tests/test_storage.py checks
                # the verdicts against shard_state's, shard by shard). A stale one may still be fresh by the
                # inputs it recorded: left to the runner's own rule.
                memo[(name, k)] = s == "complete"
            states[s] += 1
            if s == "stale":
                stale_shards.append(k)
            elif s == "pending":
                pending.append(k)
        ok = err = skipped = 0
        reasons: collections.Counter = collections.Counter()
        examples: dict[str, str] = {}
        for k in completed(name):
            m = read_marker(name, k) or {}
            ok += m.get("ok", 0)
            err += m.get("error", 0)
            skipped += m.get("skipped", 0)
            for reason, n in m.get("top_errors", []):
                cause = normalise_reason(reason)  # one cause over shards, shown as its first message
                reasons[cause] += n
                examples.setdefault(cause, reason)
        # a pending shard (no marker) whose last attempt raised carries the runner's failure note
        failed, failures = [], []
        for k in pending:
            note = _failed_attempt(root, name, k)
            if note is not None:
                failed.append(k)
                failures.append(f"shard {k}: {note.get('error', 'failed')}")
        report.append({
            "stage": name,
            "shards_expected": len(expected),
            "complete": states["complete"],
            "stale": states["stale"],
            "pending": states["pending"],
            "failed": len(failed),
            "failed_shards": failed,
            "failures": failures[:max_errors],
            "stale_shards": stale_shards,
            "rows_ok": ok,
            "rows_error": err,
            "rows_skipped": skipped,
            "first_errors": [f"{examples[r]} (x{n})" for r, n in reasons.most_common(max_errors)],
            "config_hash": manifest["stages"].get(name, {}).get("config_hash"),
        })
    return {"out": root.url, "shards": len(shards), "stages": report}


REMOTE_READ_THREADS = 32  # markers of a remote root read at once


def _prefetch_markers(root: OutputRoot, shards_of: dict[str, list[int]], markers: dict) -> None:
    """Read the markers of ``shards_of`` (stage -> its completed shards) into ``markers`` (slim), in threads. For a remote root only: each read
    waits tens of milliseconds on the network (20,000 markers one after another: minutes), while on a local
    disk threads only contend for the GIL (the pass is 3-4x slower in 16 threads). A marker that fails to read
    is left out, so the pass reads it again in order and meets the error where it would have."""
    import concurrent.futures

    keys = [(name, k) for name, shards in shards_of.items() for k in shards]

    def read(key):
        try:
            return key, _slim(root.read_marker(*key))
        except Exception:  # noqa: BLE001 -- raised again, in order, by the pass's own read
            return key, _FAILED

    with concurrent.futures.ThreadPoolExecutor(REMOTE_READ_THREADS, thread_name_prefix="status-read") as pool:
        for key, m in pool.map(read, keys):
            if m is not _FAILED:
                markers[key] = m


_FAILED = object()


# What status reads of a marker. The memo holds every marker of the root until the pass ends, so it keeps only
# these: a whole marker is about 1.8 KiB of Python objects (41 MiB for 22,500 markers), this about a third of it.
_STATUS_FIELDS = ("config_hash", "fingerprint", "inputs", "ok", "error", "skipped", "top_errors")


def _slim(marker: dict | None) -> dict | None:
    if marker is None:
        return None
    out = {k: marker[k] for k in _STATUS_FIELDS if k in marker}
    if isinstance(out.get("config_hash"), str):
        out["config_hash"] = sys.intern(out["config_hash"])  # one per stage and config, shared by its shards
    if not out.get("top_errors"):
        out.pop("top_errors", None)  # read with a default
    return out


def _failed_attempt(root: OutputRoot, stage: str, shard: int) -> dict | None:
    """The note the runner leaves when a whole shard raised (cleared when the shard later completes)."""
    return root.read_json(root.path(stage, "_failed", f"shard-{shard:05d}.json"))

