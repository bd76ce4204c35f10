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

    def lookup(name: str):
        if known is not None:
            return known.get(name)
        try:
            return get_stage(name)
        except Exception:  # noqa: BLE001 -- an unknown or unloadable stage is judged by fingerprints only
            return None

    from storage.marker_index import index_usable

    names = list(known or STAGE_MODULES)
    # A root on a local filesystem is judged from each stage's marker index (one file a stage), a stage at a time
    # over all its shards; any other from its markers, shard by shard (the runner's shard_state), read in threads
    # first on a remote root.
    judge = (_IndexedJudge(root, manifest, len(shards), lookup) if index_usable(root)
             else _MarkerJudge(root, names, lookup))
    report = []
    for name in names:
        if name not in manifest["stages"] and not judge.has_markers(name):
            continue
        try:
            st = known[name] if known else get_stage(name)
        except Exception:  # noqa: BLE001
            continue
        expected = [0] if st.scope == "global" else shards
        chash = manifest["stages"].get(name, {}).get("config_hash")
        verdicts = judge.verdicts(st, expected, chash)
        states = collections.Counter(verdicts)
        stale_shards = [k for k, v in zip(expected, verdicts) if v == "stale"]
        pending = [k for k, v in zip(expected, verdicts) if v == "pending"]
        totals, causes = judge.rows(name)
        reasons: collections.Counter = collections.Counter()
        examples: dict[str, str] = {}
        for cause, n, message in causes:  # one cause over shards, shown as its first message
            reasons[cause] += n
            examples.setdefault(cause, message)
        # a pending shard (no marker) whose last attempt raised carries the runner's failure note
        failed, failures = [], []
        noted = set(root.list_dir(root.path(name, "_failed"))) if pending else set()
        for k in pending:
            if f"shard-{k:05d}.json" not in noted:
                continue
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
            "rows_ok": totals["ok"],
            "rows_error": totals["error"],
            "rows_skipped": totals["skipped"],
            "first_errors": [f"{examples[r]} (x{n})" for r, n in reasons.most_common(max_errors)],
            "config_hash": manifest["stages"].get(name, {}).get("config_hash"),
        })
    return {"out": root.url, "shards": len(shards), "stages": report}


class _MarkerJudge:
    """Verdicts from the markers themselves, shard by shard through the runner's ``shard_state``; each marker read
    once (in threads first on a remote root, where every read waits on the network)."""

    def __init__(self, root: OutputRoot, names: list[str], lookup):
        self.root, self.lookup = root, lookup
        self.memo: dict = {}  # shard states shared across stages: staleness is transitive, upstream ones are reused
        self.markers: dict[tuple[str, int], dict | None] = {}
        self.listed: dict[str, list[int]] = {}
        if not root.is_local:
            _prefetch_markers(root, {name: self.completed(name) for name in names}, self.markers)

    def completed(self, name: str) -> list[int]:  # each stage's marker folder listed once per pass (remote: many calls)
        if name not in self.listed:
            self.listed[name] = self.root.completed_shards(name)
        return self.listed[name]

    def has_markers(self, name: str) -> bool:
        return bool(self.completed(name))

    def read_marker(self, stage: str, shard: int) -> dict | None:
        key = (stage, shard)
        if key not in self.markers:
            self.markers[key] = _slim(self.root.read_marker(stage, shard))
        return self.markers[key]

    def verdicts(self, st, expected: list[int], chash: str | None) -> list[str]:
        out = []
        for k in expected:
            s = shard_state(st, self.root, k, config_hash=chash, read_marker=self.read_marker, lookup=self.lookup,
                            memo=self.memo)
            if s != "stale" and (st.name, k) not in self.memo:
                # What a downstream shard asks of this one (runner._upstream_fresh) follows from its verdict: a
                # complete shard matches its config, the inputs it records and everything upstream, so it is fresh;
                # a pending one has no marker. Stages run in pipeline order, so most of those questions are
                # answered here instead of by a second pass over the marker (tests/test_storage.py checks
                # the verdicts against shard_state's, shard by shard). A stale one may still be fresh by the
                # inputs it recorded: left to the runner's own rule.
                self.memo[(st.name, k)] = s == "complete"
            out.append(s)
        return out

    def rows(self, name: str) -> tuple[dict[str, int], list[tuple[str, int, str]]]:
        totals = {"ok": 0, "error": 0, "skipped": 0}
        causes = []
        for k in self.completed(name):
            m = self.read_marker(name, k) or {}
            for key in totals:
                totals[key] += m.get(key, 0)
            causes += [(normalise_reason(reason), n, reason) for reason, n in m.get("top_errors", [])]
        return totals, causes


class _IndexedJudge:
    """Verdicts of a local root from each stage's marker index (storage/marker_index.py), a stage at a time: the
    runner's rules (shard_state) applied to columns of all its shards at once. A shard of a per-shard stage is
    complete when it has a marker, its config hash is the manifest's, the inputs it records are exactly its
    input shards' fingerprints now (plus its external inputs), and each of those input shards is fresh; a stale
    shard's freshness (asked by the shards built from it) and every shard of a stage outside that shape (a
    global one, or one built from a stage not judged here) go through the runner's own functions, served from
    the index. tests/test_storage.py checks every verdict against shard_state's, shard by shard."""

    def __init__(self, root: OutputRoot, manifest: dict, n: int, lookup):
        from stages.shared.reasons import rules_digest

        self.root, self.manifest, self.n, self.lookup = root, manifest, n, lookup
        self.rules = rules_digest()
        self.index: dict[str, Any] = {}
        self.fresh: dict[str, Any] = {}  # stage -> numpy bool per plan shard: what runner._upstream_fresh answers
        self.fingerprints: dict[str, Any] = {}  # stage -> its markers' fingerprints per plan shard (nulls: none)
        self.memo: dict = {}
        self.seeded: set[str] = set()
        self.rows_of: dict[str, Any] = {}

    def markers(self, name: str):
        if name not in self.index:
            from storage.marker_index import stage_markers

            self.index[name] = stage_markers(self.root, name, normalise_reason, self.rules)
        return self.index[name]

    def has_markers(self, name: str) -> bool:
        return self.markers(name).table.num_rows > 0

    def read_marker(self, stage: str, shard: int) -> dict | None:
        return self.markers(stage).marker(shard)

    def rows(self, name: str):
        sm = self.markers(name)
        return sm.totals, sm.reasons

    def _seed(self) -> None:
        """What the runner's functions ask of shards already judged (their memo), before one is called."""
        if len(self.seeded) == len(self.fresh):
            return
        for name, fresh in self.fresh.items():
            if name not in self.seeded:
                self.seeded.add(name)
                self.memo.update(zip(((name, k) for k in range(self.n)), fresh.tolist()))

    def _upstream_fresh(self, name: str, shard: int) -> bool:
        from stages.runner import _upstream_fresh

        self._seed()
        return _upstream_fresh(self.root, name, shard, self.lookup, self.memo, self.read_marker)

    def verdicts(self, st, expected: list[int], chash: str | None) -> list[str]:
        import numpy as np

        vector = st.scope != "global" and all(i in self.fresh for i in st.inputs) and len(expected) == self.n
        if not vector:
            self._seed()
            out = [shard_state(st, self.root, k, config_hash=chash, read_marker=self.read_marker, lookup=self.lookup,
                               memo=self.memo) for k in expected]
            if st.scope != "global" and len(expected) == self.n:
                complete = np.array([v == "complete" for v in out], dtype=bool)
                self._judged(st.name, complete, np.array([v == "stale" for v in out], dtype=bool), None)
            return out
        has, config_ok, inputs_ok, upstream_ok, odd = self._columns(st, chash)
        complete = has & config_ok & inputs_ok & upstream_ok
        stale = has & ~complete
        # A stale shard is still fresh for what was built from it when it matches its config and the inputs it
        # recorded, and those are fresh (runner._built_from_current). Known without it: not when its config
        # changed; not when it records exactly today's inputs, since it is then stale because one is not fresh.
        unfresh = ~config_ok | inputs_ok
        if odd.any():  # a marker here or upstream that the columns do not hold exactly: the runner's own rule
            self._seed()
            for k in np.nonzero(odd)[0].tolist():
                v = shard_state(st, self.root, k, config_hash=chash, read_marker=self.read_marker,
                                lookup=self.lookup, memo=self.memo)
                complete[k], stale[k], unfresh[k] = v == "complete", v == "stale", False
        self._judged(st.name, complete, stale, unfresh)
        verdicts = np.full(self.n, "pending", dtype=object)
        verdicts[complete] = "complete"
        verdicts[stale] = "stale"
        return verdicts.tolist()

    def _judged(self, name: str, complete, stale, unfresh) -> None:
        """Record ``name``'s freshness per shard: complete ones are fresh, pending ones are not, stale ones are
        not where ``unfresh`` says so, else as the runner's rule answers."""
        import numpy as np

        fresh = complete.copy()
        ask = stale if unfresh is None else stale & ~unfresh
        for k in np.nonzero(ask)[0].tolist():
            fresh[k] = self._upstream_fresh(name, k)
        self.fresh[name] = fresh
        self.fingerprints[name] = self._dense(self.markers(name), "fingerprint")

    def _positions(self, sm) -> list[int]:
        """Each plan shard's row in ``sm``'s table (-1: no marker)."""
        if sm.stage not in self.rows_of:
            pos = [-1] * self.n
            for row, k in enumerate(sm.table.column("shard").to_pylist()):
                if 0 <= k < self.n:
                    pos[k] = row
            self.rows_of[sm.stage] = pos
        return self.rows_of[sm.stage]

    def _dense(self, sm, column: str) -> list:
        """``column`` of ``sm``'s rows per plan shard (None where a shard has no marker or no such column).
        Python lists, not Arrow arrays: pyarrow 26 imports pandas (0.2 s) on its first conversion from or to numpy."""
        if column not in sm.table.column_names:
            return [None] * self.n
        values = sm.table.column(column).to_pylist()
        return [values[p] if p >= 0 else None for p in self._positions(sm)]

    def _columns(self, st, chash: str | None):
        """Per plan shard, five masks: has a marker; its config hash is the current one; the inputs it records
        are exactly its inputs' fingerprints now (runner.input_fingerprints); each input shard is fresh; and
        "odd": its marker, or an input shard's, holds a config hash, fingerprint or inputs that are not plain
        strings (the index keeps those as written, in its ``slim`` column: judged by the runner's rule)."""
        import numpy as np

        from stages.runner import plan_fingerprint
        from storage.marker_index import input_keys

        sm = self.markers(st.name)
        n = self.n

        def same(a: list, b) -> Any:  # equal and both present; b: a list or one value for every shard
            if isinstance(b, list):
                return np.fromiter((x is not None and y is not None and x == y for x, y in zip(a, b)), bool, n)
            return np.fromiter((x == b for x in a), bool, n)

        has = np.array([p >= 0 for p in self._positions(sm)], dtype=bool)
        current = chash or self.manifest["stages"].get(st.name, {}).get("config_hash")
        # else the marker's own config (shard_state): always equal
        config_ok = same(self._dense(sm, "config_hash"), current) if current else np.ones(n, dtype=bool)
        if not st.inputs:
            expected = {"plan": [plan_fingerprint(self.root, k) for k in range(n)] if st.name == "ingest" else "none"}
        else:
            expected = {i: self.fingerprints[i] for i in st.inputs}
        odd = self._odd(sm)
        for i in st.inputs:
            odd |= self._odd(self.markers(i))
        inputs_ok = has.copy()
        if st.external_inputs is None or not st.inputs:  # (without inputs, external ones are not asked either)
            inputs_ok &= same(self._dense(sm, "input_keys"), input_keys(expected))
            for key, values in expected.items():
                inputs_ok &= same(self._dense(sm, "in:" + key), values)
        else:  # shard by shard: the names it adds may differ
            recorded = self._dense(sm, "input_keys")
            columns: dict[str, list] = {}
            ask = np.nonzero(inputs_ok)[0].tolist()
            external = (st.external_inputs_of(self.root, ask) if st.external_inputs_of is not None
                        else [st.external_inputs(self.root, k) for k in ask])
            for k, ext in zip(ask, external):
                want = {key: values[k] if isinstance(values, list) else values for key, values in expected.items()}
                want.update(ext)
                if recorded[k] != input_keys(want):
                    inputs_ok[k] = False
                    continue
                for key, value in want.items():
                    if key not in columns:
                        columns[key] = self._dense(sm, "in:" + key)
                    if value is None or columns[key][k] != value:  # None: that input shard has no marker
                        inputs_ok[k] = False
                        break
        upstream_ok = np.ones(n, dtype=bool)
        for i in st.inputs:  # every shard it was built from is fresh, directly or further up
            upstream_ok &= self.fresh[i]
        return has, config_ok, inputs_ok, upstream_ok, odd

    def _odd(self, sm) -> Any:
        import numpy as np

        return np.fromiter((x is not None for x in self._dense(sm, "slim")), bool, self.n)


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

