"""What ``motionforge review serve`` shows, read from an output root: the MotionBench review queue (with the
first-frame judges' answers, decision history, progress and conflicts) and the dataset explorer's rows.

Read-only over the stage tables. The only writes are the ones ``review export`` / ``review import`` make
too: first-frame JPEGs (``write_first_frames``) and decision batches (``validate_items`` +
``store_decisions``, the same functions ``review import`` calls), so staleness and ``run-stage review``
behave exactly as after an import.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from typing import Any, Callable

from stages.shared.reasons import normalise_reason
from schemas._base import STATUS_OK, from_table
from schemas.ffilter_verdicts import ROW_DECISION, ROW_VERDICT, SCHEMA as FF_SCHEMA, FilterVerdict
from schemas.questions import Question
from stages.motionbench import review as rv
from stages.shared.motionbench_format import CATEGORY_NAMES, LETTERS
from storage.root import OutputRoot


class RequestError(ValueError):
    """A reviewer's request that cannot be applied; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _markers_key(root: OutputRoot, stages: tuple[str, ...]) -> tuple:
    """Changes whenever one of these stages completes or rewrites a shard: its markers' file stamps, from one
    listing per stage (every request checks it: reading each marker took seconds on a root of thousands of
    shards). Where the filesystem keeps no modification times, the markers' own fingerprints."""
    key = []
    for s in stages:
        stamps = root.file_stamps(root.path(s, "_markers"))
        for name, stamp in sorted(stamps.items()):
            if not (name.startswith("shard-") and name.endswith(".json")):
                continue
            if stamp[-2] is None:
                m = root.read_json(root.path(s, "_markers", name)) or {}
                stamp = (m.get("fingerprint"), m.get("finished_at") or m.get("created_at"))
            key.append((s, name, stamp))
    return tuple(key)


def decision_dict(d: rv.Decision) -> dict:
    out = dataclasses.asdict(d)
    out["options"] = list(d.options) if d.options else None
    return out


def _verdict_of(d: rv.Decision) -> tuple:
    """What two reviewers must agree on: the decision, and for an edit the answer and category it sets."""
    return (d.decision,) if d.decision != "edit" else (d.decision, d.answer, d.category)


class ReviewQueue:
    """The questions waiting for the manual check (kept by ffilter), their decisions, and reviewer claims.

    Claims are soft and in memory: the question a reviewer has open is not handed to another reviewer for
    ``claim_s`` seconds, so two people working at once do not review the same question twice. A decision is
    stored whether or not its question was claimed; nothing depends on claims for correctness.
    """

    def __init__(self, root: OutputRoot, claim_s: float = 600.0):
        self.root = root
        self.claim_s = claim_s
        self._lock = threading.Lock()
        self._claims: dict[str, tuple[str, float]] = {}
        self._key: tuple | None = None
        self._index: dict[str, tuple[int, Question]] = {}
        self._order: list[str] = []
        self._judges: dict[str, list[dict]] = {}
        self._ffilter: dict[str, dict] = {}
        self._clips: dict[str, dict] = {}
        self._batches: dict = {}  # parsed decision batch files (never rewritten, so never invalid)

    # -- tables (re-read when a stage rewrites a shard) ----------------------------------------------------
    def _refresh(self) -> None:
        key = _markers_key(self.root, ("qgen", "ffilter", "scenes"))
        if key == self._key:
            return
        index = rv.question_index(self.root)
        judges: dict[str, list[dict]] = {}
        ffilter: dict[str, dict] = {}
        kept: set[str] = set()
        for shard in self.root.completed_shards("ffilter"):
            for v in from_table(self.root.read_shard("ffilter", shard, FF_SCHEMA), FilterVerdict):
                if v.row_kind == ROW_VERDICT:
                    judges.setdefault(v.question_id, []).append(
                        {"judge": v.judge, "model": v.judge_model, "answer": v.answer_letter, "correct": v.correct,
                         "raw_reply": v.raw_reply, "status": v.status, "error": v.error})
                elif v.row_kind == ROW_DECISION:
                    ffilter[v.question_id] = {"kept": v.kept, "n_correct": v.n_correct, "n_judges": v.n_judges,
                                              "status": v.status, "error": v.error}
                    if v.status == STATUS_OK:
                        kept.add(v.question_id)
        clips: dict[str, dict] = {}
        for _, table in self.root.iter_stage("scenes", columns=("clip_id", "fps", "width", "height")):
            if "clip_id" in table.column_names:
                for c in table.to_pylist():
                    clips[c["clip_id"]] = c
        order = sorted((qid for qid in index if qid in kept),
                       key=lambda q: (index[q][0], index[q][1].clip_id, index[q][1].generation_index or 0, q))
        self._index, self._order, self._judges, self._ffilter, self._clips = index, order, judges, ffilter, clips
        self._key = key

    def _history(self) -> dict[str, list[rv.Decision]]:
        out: dict[str, list[rv.Decision]] = {}
        for shard in sorted({s for s, _ in self._index.values()}):
            for d in rv.decision_history(self.root, shard, self._batches):
                out.setdefault(d.question_id, []).append(d)
        return out

    # -- views ---------------------------------------------------------------------------------------------
    def question(self, qid: str) -> dict:
        with self._lock:
            self._refresh()
            if qid not in self._index:
                raise RequestError(f"unknown question {qid!r}: not in the qgen table of {self.root.url}", 404)
            shard, q = self._index[qid]
            history = [d for d in rv.decision_history(self.root, shard, self._batches) if d.question_id == qid]
        item = rv.export_item(q, history[-1] if history else None)
        clip = self._clips.get(q.clip_id, {})
        return {
            **item, "shard": shard, "video_id": q.video_id,
            "category_name": CATEGORY_NAMES.get(q.category or "", ""), "categories": CATEGORY_NAMES,
            "fps": clip.get("fps") or 25.0, "width": clip.get("width"), "height": clip.get("height"),
            "judges": self._judges.get(qid, []), "ffilter": self._ffilter.get(qid),
            "reviewable": qid in self._order,
            "history": [decision_dict(d) for d in history],
            "conflict": _conflict(history),
            "video_url": f"/media/review/{qid}/video", "first_frame_url": f"/media/review/{qid}/first_frame.jpg",
        }

    def next_pending(self, reviewer: str, after: str | None = None) -> str | None:
        """The next question nobody has decided and no other reviewer has open; claims it for ``reviewer``
        (a reviewer holds one claim: the question on their screen)."""
        with self._lock:
            self._refresh()
            decided = set(self._history())
            now = time.monotonic()
            self._claims = {q: c for q, c in self._claims.items() if now - c[1] < self.claim_s and q not in decided}
            order = self._order
            if after in order:  # continue after the question just decided, then wrap round
                i = order.index(after) + 1
                order = order[i:] + order[:i]
            for qid in order:
                if qid in decided:
                    continue
                claim = self._claims.get(qid)
                if claim is not None and claim[0] != reviewer:
                    continue
                self._claims = {q: c for q, c in self._claims.items() if c[0] != reviewer}
                self._claims[qid] = (reviewer, now)
                return qid
            return None

    def held_by_others(self, reviewer: str) -> int:
        """Undecided questions another reviewer has open right now."""
        with self._lock:
            return sum(1 for c in self._claims.values() if c[0] != reviewer)

    def progress(self) -> dict:
        with self._lock:
            self._refresh()
            history = self._history()
            order = list(self._order)
            index = self._index
        by_category: dict[str, dict[str, int]] = {}
        by_reviewer: dict[str, dict[str, int]] = {}
        decisions = {d: 0 for d in rv.DECISIONS}
        conflicts = []
        reviewed = 0
        for qid in order:
            cat = index[qid][1].category or "?"
            c = by_category.setdefault(cat, {"reviewed": 0, "total": 0})
            c["total"] += 1
            hist = history.get(qid, [])
            if not hist:
                continue
            reviewed += 1
            c["reviewed"] += 1
            decisions[hist[-1].decision] += 1
            latest = {d.reviewer: d for d in hist}
            for name, d in latest.items():
                r = by_reviewer.setdefault(name, {"reviewed": 0, **{k: 0 for k in rv.DECISIONS}})
                r["reviewed"] += 1
                r[d.decision] += 1
            if _conflict(hist):
                conflicts.append({"question_id": qid, "category": cat,
                                  "decisions": [decision_dict(d) for d in latest.values()]})
        return {"reviewed": reviewed, "total": len(order), "pending": len(order) - reviewed,
                "decisions": decisions, "by_category": dict(sorted(by_category.items())),
                "by_reviewer": dict(sorted(by_reviewer.items())), "conflicts": conflicts}

    # -- the one write ---------------------------------------------------------------------------------------
    def decide(self, payload: dict) -> dict:
        """Validate one reviewer decision with the rules of ``review import`` and append it (its own batch
        file, written atomically). Raises :class:`RequestError` and stores nothing when it is invalid."""
        if not isinstance(payload, dict):
            raise RequestError("the request body must be a JSON object")
        qid = str(payload.get("question_id") or "").strip()
        reviewer = str(payload.get("reviewer") or "").strip()
        if not reviewer:
            raise RequestError("no reviewer id: enter your name in the reviewer box")
        with self._lock:
            self._refresh()
            if qid not in self._index:
                raise RequestError(f"unknown question {qid!r}: not in the qgen table of {self.root.url}", 404)
            if qid not in self._order:
                raise RequestError(f"question {qid} is not waiting for review (ffilter did not keep it)", 409)
            index = self._index
        item = {k: payload.get(k) for k in ("question_id", "decision", "reviewer", "reason", "category")}
        if str(payload.get("decision") or "").strip().lower() == "edit" or any(
                payload.get(k) is not None for k in ("question", "options", "answer")):
            item.update(question=payload.get("question"), options=payload.get("options"), answer=payload.get("answer"))
        if not item["category"]:
            item["category"] = None
        if not str(item.get("decision") or "").strip():
            raise RequestError("no decision: accept, reject or edit")
        by_shard, _, problems = rv.validate_items(self.root, [("request", item)], index=index)
        if problems:
            raise RequestError("; ".join(p.removeprefix("request: ") for p in problems))
        now = dt.datetime.now(dt.timezone.utc)
        rv.store_decisions(self.root, by_shard, now=now)
        with self._lock:
            self._claims.pop(qid, None)
        d = by_shard[next(iter(by_shard))][0]
        return {**decision_dict(d), "decided_at": d.decided_at or now.isoformat()}

    def video_path(self, qid: str) -> str:
        return self.question(qid)["clip_path"]

    def first_frame_path(self, qid: str) -> str | None:
        item = self.question(qid)
        rv.write_first_frames(self.root, [item], rv.first_frame_of_item)
        return item["first_frame"]


def _conflict(history: list[rv.Decision]) -> bool:
    latest = {d.reviewer: d for d in history}
    return len({_verdict_of(d) for d in latest.values()}) > 1


# -- explorer ----------------------------------------------------------------------------------------------
IMOVE_STAGES = ("detect", "track", "trackfilter", "caption", "check", "tasks")


# The columns the explorer's list reads of each stage (a stage's other columns, e.g. a track's points or a
# sample's conversations, are read only for the one instance opened, from its own shard).
_DETECT_COLUMNS = ("instance_id", "clip_id", "video_id", "label", "start_s", "end_s", "fps", "width",
                   "height", "tag_score", "detection_score", "clip_score", "box_xyxy_px", "status", "error")
LIST_COLUMNS = {"detect": _DETECT_COLUMNS, "tag": ("clip_id", "tags"), "scenes": ("clip_id", "fps"),
                **{s: ("instance_id", "status", "error") for s in IMOVE_STAGES[1:]}}


class Tables:
    """Stage tables as row dicts (with the shard each row came from as ``_shard``), read once and re-read only
    when the stage's markers change (a shard was written), so the explorer does not re-read Parquet on every
    request; ``columns`` reads only those."""

    def __init__(self, root: OutputRoot):
        self.root = root
        self._lock = threading.Lock()
        self._cache: dict[tuple, tuple[tuple, Any]] = {}

    def rows(self, stage: str, columns: tuple[str, ...] | None = None) -> list[dict]:
        return self.memo(("rows", stage, columns), (stage,), lambda: _read_rows(self.root, stage, columns))

    def memo(self, name: tuple, stages: tuple[str, ...], build: Callable[[], Any]) -> Any:
        """``build()``, kept until one of ``stages`` writes a shard."""
        key = _markers_key(self.root, stages)
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and hit[0] == key:
                return hit[1]
        value = build()
        with self._lock:
            self._cache[name] = (key, value)
        return value


def _read_rows(root: OutputRoot, stage: str, columns: tuple[str, ...] | None) -> list[dict]:
    out = []
    for shard, table in root.iter_stage(stage, columns=columns):
        out.extend(dict(r, _shard=shard) for r in table.to_pylist())
    return out


def _tables(root: OutputRoot | Tables) -> Tables:
    return root if isinstance(root, Tables) else Tables(root)


def _rows(root: OutputRoot | Tables, stage: str) -> list[dict]:
    return _tables(root).rows(stage)


def _url(root: OutputRoot | Tables) -> str:
    return root.root.url if isinstance(root, Tables) else root.url


def imove_instances(root: OutputRoot | Tables) -> list[dict]:
    """One entry per detected instance: where it got to in the iMOVE-IT stages, and why it stopped there (and
    the shard it is in, where :func:`imove_instance` reads its details). For a large root, page through
    :func:`instance_table` with :func:`instance_rows` instead."""
    return instance_rows(instance_table(root))


def instance_table(root: OutputRoot | Tables):
    """:func:`imove_instances` as one Arrow table (``tags`` for ``clip_tags``), sorted by video, start and id;
    kept until an iMOVE-IT stage, ``tag`` or ``scenes`` writes a shard. Columns, not a dict per instance: a
    root has millions of instances."""
    t = _tables(root)
    return t.memo(("instance_table",), IMOVE_STAGES + ("tag", "scenes"), lambda: _instance_table(t.root))


def instance_rows(table) -> list[dict]:
    """The explorer's rows of (a slice of) :func:`instance_table`."""
    out = []
    for r in table.to_pylist():
        tags = r.pop("tags")
        r["clip_tags"] = [x.get("tag") for x in (tags or [])]
        out.append({k: r[k] for k in _ROW_KEYS})
    return out


_ROW_KEYS = ("instance_id", "clip_id", "video_id", "label", "shard", "status", "reason", "error", "start_s", "end_s",
             "fps", "width", "height", "tag_score", "clip_tags", "detection_score", "clip_score", "box_xyxy_px")


def _stage_table(root: OutputRoot, stage: str, columns: tuple[str, ...]):
    """The stage's completed shards, only ``columns``, with each row's shard as ``_shard`` (None: no shard)."""
    import pyarrow as pa

    parts = [table.append_column("_shard", pa.array([shard] * table.num_rows, pa.int32()))
             for shard, table in root.iter_stage(stage, columns=columns)]
    parts = [p for p in parts if p.num_rows]
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def _last_per(table, key: str):
    """One row per ``key``: the last one read (as a dict built row by row would keep)."""
    import pyarrow as pa

    rows = table.append_column("_row", pa.array(range(table.num_rows), pa.int64()))
    last = rows.group_by(key, use_threads=False).aggregate([("_row", "max")])
    return table.take(last["_row_max"])


def _first_problem_per(table, key: str):
    """One row per ``key``: its first row that is not ok, else its first row (an instance's task samples)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    ok = pc.fill_null(pc.equal(table["status"], STATUS_OK), False)
    # rank: a row that is not ok ranks by its position (< n), an ok row after every such row (n + position)
    rank = pc.add(pa.array(range(n), pa.int64()), pc.if_else(ok, pa.scalar(n, pa.int64()), pa.scalar(0, pa.int64())))
    best = table.select([key]).append_column("_rank", rank).group_by(key, use_threads=False).aggregate([("_rank", "min")])
    ranks = best["_rank_min"]
    return table.take(pc.if_else(pc.greater_equal(ranks, n), pc.subtract(ranks, n), ranks))


def _lookup(keys, table, key: str, *columns: str) -> list:
    """``table[c]`` for each of ``keys``, for each of ``columns`` (``table`` has one row per ``key``); null where
    it has none. Index lookups rather than a join: Arrow's hash join cannot carry list columns (boxes, tags)."""
    import pyarrow.compute as pc

    at = pc.index_in(keys, value_set=table[key])
    return [pc.take(table[c], at) for c in columns]


def _instance_table(root: OutputRoot):
    import pyarrow as pa
    import pyarrow.compute as pc

    det = _stage_table(root, "detect", LIST_COLUMNS["detect"])
    if det is None:
        return pa.table({k: pa.array([], pa.string()) for k in _ROW_KEYS if k != "clip_tags"} | {"tags": pa.array([])})
    det = _last_per(det, "instance_id")
    n, ids = det.num_rows, det["instance_id"]
    status, error = pa.nulls(n, pa.string()), pa.nulls(n, pa.string())
    decided = stopped = pa.array([False] * n)  # stopped: dropped or errored somewhere, so it has a reason
    for s in IMOVE_STAGES:
        if s == "detect":
            st, er = det["status"], det["error"]
        else:
            t = _stage_table(root, s, LIST_COLUMNS[s])
            if t is None:
                st, er = pa.nulls(n, pa.string()), pa.nulls(n, pa.string())
            else:
                t = _first_problem_per(t, "instance_id") if s == "tasks" else _last_per(t, "instance_id")
                st, er = _lookup(ids, t, "instance_id", "status", "error")
        missing = pc.and_(pc.invert(decided), pc.is_null(st))
        bad = pc.and_(pc.invert(decided), pc.fill_null(pc.not_equal(st, STATUS_OK), False))
        status = pc.if_else(missing, pa.scalar(f"waiting for {s}"), status)
        status = pc.if_else(bad, pc.if_else(pc.equal(st, "error"), pa.scalar(f"error at {s}"),
                                            pa.scalar(f"dropped at {s}")), status)
        error = pc.if_else(bad, er, error)
        stopped = pc.or_(stopped, bad)
        decided = pc.or_(decided, pc.or_(missing, bad))
    status = pc.fill_null(status, "in dataset")
    distinct = pc.unique(error)  # each message normalised once
    causes = pa.array([normalise_reason(m) for m in distinct.to_pylist()], pa.string())
    reason = pc.if_else(stopped, pc.take(causes, pc.index_in(error, distinct)), pa.nulls(n, pa.string()))
    tag = _stage_table(root, "tag", LIST_COLUMNS["tag"])
    tags = _lookup(det["clip_id"], _last_per(tag, "clip_id"), "clip_id", "tags")[0] if tag is not None else pa.nulls(n)
    fps = det["fps"]
    scenes = _stage_table(root, "scenes", LIST_COLUMNS["scenes"])
    clip_fps = (_lookup(det["clip_id"], _last_per(scenes, "clip_id"), "clip_id", "fps")[0] if scenes is not None
                else pa.nulls(n, fps.type))
    fps = pc.if_else(pc.fill_null(pc.not_equal(fps, 0), False), fps, clip_fps)  # the detection's own, else its clip's
    cols = {"instance_id": ids, "clip_id": det["clip_id"], "video_id": det["video_id"], "shard": det["_shard"],
            "status": status, "reason": reason, "error": error, "fps": fps, "tags": tags}
    for k in ("label", "start_s", "end_s", "width", "height", "tag_score", "detection_score", "clip_score",
              "box_xyxy_px"):
        cols[k] = det[k]
    return pa.table(cols).sort_by([("video_id", "ascending"), ("start_s", "ascending"), ("instance_id", "ascending")])


def imove_instance(root: OutputRoot | Tables, iid: str) -> dict:
    """One instance's summary and its rows of every iMOVE-IT stage, read from its own shard only."""
    import pyarrow.compute as pc

    t = _tables(root)
    table = instance_table(t)
    found = instance_rows(table.filter(pc.equal(table["instance_id"], iid)))
    if not found:
        raise RequestError(f"unknown instance {iid!r}: not in the detect table of {_url(root)}", 404)
    summary = found[0]

    def rows_of(stage: str) -> list[dict]:
        if t.root.read_marker(stage, summary["shard"]) is None:  # only completed shards, as the list reads
            return []
        table = t.root.read_shard(stage, summary["shard"])
        return table.filter(pc.equal(table["instance_id"], iid)).to_pylist()

    detail: dict[str, Any] = {"summary": summary}
    det = rows_of("detect")[0]
    detail["video_path"] = det["video_path"]
    for s in ("track", "trackfilter", "caption", "check"):
        detail[s] = next((_plain(r) for r in rows_of(s)), None)
    detail["samples"] = [_plain(r) for r in rows_of("tasks")]
    detail["video_url"] = f"/media/imove/{iid}/video"
    return detail


def _plain(row: dict) -> dict:
    return {k: (v.isoformat() if isinstance(v, (dt.datetime, dt.date)) else v) for k, v in row.items()}


def motionbench_questions(root: OutputRoot | Tables) -> list[dict]:
    """The benchmark's questions (finalize; qgen before finalize has run) by category and split."""
    rows = _rows(root, "finalize")
    source = "finalize"
    if not rows:
        rows, source = _rows(root, "qgen"), "qgen"
    out = []
    for r in rows:
        if r["status"] != STATUS_OK:
            continue
        clip = r.get("clip_path")
        span = (0.0, r["end_s"] - r["start_s"]) if clip and r.get("end_s") is not None else (r.get("start_s"), r.get("end_s"))
        out.append({"question_id": r["question_id"], "category": r.get("category"),
                    "play_start_s": span[0], "play_end_s": span[1],
                    "category_name": CATEGORY_NAMES.get(r.get("category") or "", ""),
                    "split": r.get("split") or "(not split yet)", "question": r.get("question"),
                    "options": dict(zip(LETTERS, r.get("options") or [])), "answer": r.get("answer"),
                    "video_id": r.get("video_id"), "start_s": r.get("start_s"), "end_s": r.get("end_s"),
                    "source": source, "video_url": f"/media/motionbench/{r['question_id']}/video"})
    return sorted(out, key=lambda r: (r["split"], r["category"] or "", r["question_id"]))


def motionbench_video(root: OutputRoot | Tables, qid: str) -> tuple[str, float | None, float | None]:
    """(file to play, start, end within it) of a benchmark question."""
    for stage in ("finalize", "qgen"):
        for r in _rows(root, stage):
            if r["question_id"] == qid:
                clip = r.get("clip_path")
                if clip:
                    return clip, 0.0, (r["end_s"] - r["start_s"]) if r.get("end_s") is not None else None
                return r["video_path"], r.get("start_s"), r.get("end_s")
    raise RequestError(f"unknown question {qid!r}", 404)
