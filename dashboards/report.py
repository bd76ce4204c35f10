"""A static HTML report of an output root: per-stage counts, drop reasons, and distributions.

Read-only over storage. Plots are matplotlib PNGs embedded as data URLs, so the page is one file that can
be attached to a Prefect artifact, mailed or opened from a bucket. Sections appear for the stages present.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import datetime as dt
import html
import io
from pathlib import Path
from typing import Any

from stages.shared.reasons import ReasonCounter
from dashboards.status import root_status
from storage.root import OutputRoot, table_blocks

MB_CATEGORY_NAMES = {"MR": "Motion Recognition", "LM": "Location-related Motion", "AO": "Action Order",
                     "RC": "Repetition Count", "MO": "Motion-related Objects", "CM": "Camera Motion"}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _hist(values: list[float], title: str, xlabel: str, bins: int = 30) -> str | None:
    if not values:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(values, bins=bins, color="#4C72B0")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    return _png(fig)


def _bars(counts: dict[str, int], title: str, top: int = 25) -> str | None:
    if not counts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    fig, ax = plt.subplots(figsize=(5, max(2.0, 0.25 * len(items) + 0.8)))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="#55A868")
    ax.set_title(title)
    ax.set_xlabel("count")
    return _png(fig)


# What the report reads of each stage: every stage's ``status`` and ``error`` (drop reasons), and these columns
# for its sections. Each completed shard of a stage is read once, with only those columns (the ones its file
# has), and folded into running counts: the report holds one shard's columns and the counts, never a whole
# stage (the track table of a million-video root is tens of GB; benchmarks/bench_reads_at_scale.py).
_QUESTION_COLUMNS = ("question", "options", "key", "clip_id", "video_id", "start_s", "end_s", "category", "split",
                     "answer")
QUESTION_STAGES = ("finalize", "review", "qgen")  # the MotionBench statistics' source: the first with questions
COLUMNS = {
    "ingest": ("video_id", "duration_s"),
    "scenes": ("duration_s",),
    "tag": ("tags",),
    "track": ("label",),
    "tasks": ("task", "t1_s", "t2_s", "dynamic_caption", "instance_id", "label", "video_id", "clip_id"),
    **{s: _QUESTION_COLUMNS for s in QUESTION_STAGES},
}


# Consecutive shards are folded as one table (storage.root.table_blocks): every fold is a sum over rows, so the
# result is the same, and each Arrow call a fold makes (a filter, value counts; ~0.1 ms each whatever the size)
# is paid per block instead of per shard. 1,500 shards of 15 stages: 21,000 folds and 99,000 compute calls.
_BLOCK_ROWS = 65_536
_BLOCK_SHARDS = 512


def _shard_tables(root: OutputRoot, stage: str):
    """The stage's completed shards, the columns the report reads, as blocks of consecutive shards."""
    shards = root.iter_stage(stage, columns=("status", "error", *COLUMNS.get(stage, ())))
    for _, block in table_blocks(shards, max_rows=_BLOCK_ROWS, max_tables=_BLOCK_SHARDS, promote=True):
        yield block


def _ok_rows(table):
    import pyarrow.compute as pc

    return table.filter(pc.fill_null(pc.equal(table["status"], "ok"), False))


def _value_counts(column) -> list[tuple[Any, int]]:
    """(value, rows) in order of first appearance."""
    import pyarrow.compute as pc

    return [(d["values"], d["counts"]) for d in pc.value_counts(column).to_pylist()]


def _column(parts: list, type_=None):
    """One chunked array of the per-shard arrays (or chunked arrays) in ``parts``."""
    import pyarrow as pa

    chunks = [c for p in parts for c in (p.chunks if isinstance(p, pa.ChunkedArray) else (p,))]
    return pa.chunked_array(chunks, type_) if chunks or type_ is not None else None


def _floats(parts: list) -> list[float]:
    import pyarrow as pa

    return _column(parts, pa.float64()).drop_null().to_pylist()


def _top(counts: collections.Counter, n: int) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))[:n]


class _Stage:
    """One stage folded shard by shard: drop reasons, and the counts and values its sections show."""

    def __init__(self, name: str, question_details: bool = True):
        self.name = name
        self.question_details = question_details  # per-clip sums of questions (only for the statistics' source)
        self.present = False  # has completed shards (a section with no rows still shows its zero)
        self.reasons = ReasonCounter()  # rows that are not ok, by cause
        self.columns: set[str] = set()
        self.values: dict[str, list] = collections.defaultdict(list)  # column -> ok values, one chunk per shard
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

    def fold(self, table) -> None:
        import pyarrow.compute as pc

        self.present = True
        self.columns.update(table.column_names)
        bad = table.filter(pc.invert(pc.fill_null(pc.equal(table["status"], "ok"), False)))
        for message, n in (_value_counts(bad["error"]) if "error" in bad.column_names else [(None, bad.num_rows)]):
            if n:
                self.reasons.add(message, n)
        ok = _ok_rows(table)
        self.counts["status"]["ok"] += ok.num_rows
        for col, kind in _FOLDS.get(self.name, ()):
            if col in ok.column_names and ok.num_rows:
                kind(self, col, ok)

    def count(self, col: str, ok) -> None:
        for v, n in _value_counts(ok[col].drop_null()):
            self.counts[col][v] += n

    def keep(self, col: str, ok) -> None:
        self.values[col].append(ok[col])


def _fold_tags(st: _Stage, col: str, ok) -> None:
    import pyarrow.compute as pc

    flat = pc.list_flatten(ok[col])
    if len(flat):
        for v, n in _value_counts(pc.struct_field(flat, "tag")):
            st.counts["tag"][v] += n


def _fold_samples(st: _Stage, col: str, ok) -> None:
    import pyarrow.compute as pc

    st.count("task", ok)
    st.values["interval"].append(pc.subtract(ok["t2_s"], ok["t1_s"]))
    dyn = ok.filter(pc.equal(ok["task"], "dynamic_captioning"))["dynamic_caption"].drop_null()
    st.values["caption_words"].append([len(c.split()) for c in dyn.to_pylist()])
    st.values["objects"].append(ok.select(["instance_id", "label"]).group_by(["instance_id", "label"]).aggregate([]))
    st.values["videos"].append(pc.unique(ok["video_id"]))
    st.values["clips"].append(pc.unique(ok["clip_id"]))


_QUESTION_COLUMNS = ("category", "answer", "question", "key", "clip_id", "video_id", "start_s", "end_s", "options",
                     "split")


def _fold_questions(st: _Stage, col: str, ok) -> None:
    """MotionBench statistics' running sums (see :func:`motionbench_statistics`), over rows with a question."""
    q = st.counts
    # A global stage's one shard holds every question: its rows become dicts a batch at a time, read columns only.
    ok = ok.select([c for c in _QUESTION_COLUMNS if c in ok.column_names])
    for batch in ok.to_batches(max_chunksize=4096):
        for r in batch.to_pylist():
            if r.get("category") is not None:
                q["category"][r["category"]] += 1
            if r.get("answer") is not None:
                q["answer"][r["answer"]] += 1
            if not r.get("question"):
                continue
            q["sums"]["questions"] += 1
            if not st.question_details:
                continue
            key = r.get("key") or r.get("clip_id") or f"{r['video_id']}:{r.get('start_s')}:{r.get('end_s')}"
            q["per_key"][key] += 1
            if r.get("start_s") is not None and r.get("end_s") is not None:
                st.values.setdefault("clip_dur", {})[key] = float(r["end_s"]) - float(r["start_s"])
            else:
                st.values.setdefault("whole_video_of", {})[key] = r["video_id"]
            q["sums"]["chars"] += len(r["question"])
            q["sums"]["option_chars"] += sum(len(o) for o in (r.get("options") or []))
            q["sums"]["words"] += len(r["question"].split())
            cat = MB_CATEGORY_NAMES.get(r.get("category"), r.get("category") or "?")
            q["split:" + cat][r.get("split") or "(not split)"] += 1


_FOLDS = {
    "ingest": (("video_id", _Stage.keep), ("duration_s", _Stage.keep)),
    "scenes": (("duration_s", _Stage.keep),),
    "tag": (("tags", _fold_tags),),
    "track": (("label", _Stage.count),),
    "tasks": (("task", _fold_samples),),
    **{s: (("question", _fold_questions),) for s in QUESTION_STAGES},
}


class _Folds:
    """``folds(stage)``: the stage's :class:`_Stage`, its shards read once per report however many sections look
    at it. ``question_source``: the one question stage whose per-clip sums are kept (the others count their
    questions only); asking for another stage's details re-reads it."""

    def __init__(self, root: OutputRoot, question_source: str | None = None):
        self.root = root
        self.question_source = question_source
        self._done: dict[str, _Stage] = {}

    def __call__(self, stage: str, question_details: bool = False) -> _Stage:
        details = question_details or self.question_source in (None, stage)
        hit = self._done.get(stage)
        if hit is None or (details and not hit.question_details):
            hit = _Stage(stage, question_details=details)
            for table in _shard_tables(self.root, stage):
                hit.fold(table)
            self._done[stage] = hit
        return hit

    def ingest_durations(self, video_ids) -> dict[str, float]:
        """video_id -> duration of those videos ingest took (ok rows with a duration)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        ingest = self("ingest")
        ids = ingest.values.get("video_id")
        if not ids or "duration_s" not in ingest.columns:
            return {}
        table = pa.table({"v": _column(ids), "d": _column(ingest.values["duration_s"], pa.float64())})
        table = table.filter(pc.is_in(table["v"], value_set=pa.array(list(video_ids), pa.string())))
        return {v: d for v, d in zip(table["v"].to_pylist(), table["d"].to_pylist()) if d}


def collect(out: str) -> dict[str, Any]:
    """Everything the page shows, as plain values (also useful for Prefect artifacts and tests)."""
    root = OutputRoot(out)
    st = root_status(out)
    ok_rows = {s["stage"]: s["rows_ok"] for s in st["stages"]}  # from the shards' markers
    folds = _Folds(root, next((s for s in QUESTION_STAGES if ok_rows.get(s)), None))
    data: dict[str, Any] = {"status": st, "drop_reasons": {}, "plots": {}, "numbers": {}}
    for s in st["stages"]:
        groups = folds(s["stage"]).reasons.groups()
        if groups:
            data["drop_reasons"][s["stage"]] = groups
    clips = folds("scenes")
    durations = _floats(clips.values["duration_s"])
    data["numbers"]["clips"] = len(durations)
    data["plots"]["clip durations"] = _hist(durations, "clip duration", "seconds")
    tags = folds("tag")
    if tags.present and "tags" in tags.columns:
        data["plots"]["first-frame tags"] = _bars(dict(tags.counts["tag"]), "RAM++ tags kept (first frames)")
    tracks = folds("track")
    if tracks.present:
        data["plots"]["instance categories"] = _bars(dict(tracks.counts["label"]), "tracked instance categories")
    samples = folds("tasks")
    if samples.present:
        data["numbers"]["imove_it_samples"] = samples.counts["status"]["ok"]
        data["plots"]["iMOVE-IT tasks"] = _bars(dict(samples.counts["task"]), "samples per task")
        data["plots"]["time intervals"] = _hist(_floats(samples.values["interval"]),
                                                "instance motion interval (t2 - t1)", "seconds")
        data["plots"]["caption lengths"] = _hist([n for chunk in samples.values["caption_words"] for n in chunk],
                                                  "dynamic caption length", "words")
    for name in ("finalize", "qgen"):
        q = folds(name)
        if q.present and "category" in q.columns:
            cats = collections.Counter()
            for c, n in q.counts["category"].items():
                cats[MB_CATEGORY_NAMES.get(c, c)] += n
            data["numbers"][f"{name}_questions"] = sum(cats.values())
            data["plots"][f"MotionBench categories ({name})"] = _bars(dict(cats), f"questions per category ({name})")
            if "answer" in q.columns:
                data["plots"][f"answer letters ({name})"] = _bars(dict(q.counts["answer"]), f"answer letters ({name})")
            break
    mb = motionbench_statistics(root, folds)
    if mb:
        data["motionbench"] = mb
        data["plots"]["MotionBench questions per video"] = _hist(mb["questions_per_video_values"], "questions per video",
                                                                 "questions", bins=max(1, min(20, max(mb["questions_per_video_values"]))))
        data["plots"]["MotionBench clip durations"] = _hist(mb["clip_durations_values"], "MotionBench clip duration", "seconds")
    im = imove_it_statistics(root, folds)
    if im:
        data["imove_it"] = im
    data["plots"] = {k: v for k, v in data["plots"].items() if v}
    return data


# What the papers report for their releases, printed beside ours.
MOTIONBENCH_RELEASE = {"videos": 5385, "questions": 8052, "annotation_density": 68.4}  # MotionBench 3.2
IMOVE_IT_RELEASE = {"objects": 114705, "categories": 23278, "objects_per_category": 5,  # iMOVE appendix
                    "samples_per_task": {"spatial_grounding": 51992, "temporal_grounding": 21328,
                                         "dynamic_captioning": 41385},
                    "videos": 68000, "mean_video_duration_s": 109.0}  # iMOVE 3.1.2: "68k unique videos", 109 s


def motionbench_statistics(root: OutputRoot, folds: _Folds | None = None) -> dict[str, Any] | None:
    """The statistics MotionBench gives for itself (section 3.2, Fig. 2 and 3), over the benchmark's questions:
    ``finalize`` when it has run, else the questions the review kept, else qgen's.

    Annotation density is "total length of questions / video duration" (eq. 1). The paper does not say how
    length is counted; we count characters of the question text and, separately, of question plus options,
    and words, each over the summed duration of the distinct video clips the questions are about (a clip
    without a span counts its whole video's duration, from ingest).
    """
    folds = folds or _Folds(root)
    for name in QUESTION_STAGES:
        if folds(name).counts["sums"]["questions"]:
            q = folds(name, question_details=True)
            break
    else:
        return None
    sums, per_key = q.counts["sums"], q.counts["per_key"]
    clip_dur = dict(q.values.get("clip_dur", {}))
    whole_of = {k: v for k, v in q.values.get("whole_video_of", {}).items() if k not in clip_dur}
    whole = folds.ingest_durations(set(whole_of.values())) if whole_of else {}
    clip_dur.update({k: float(whole[v]) for k, v in whole_of.items() if v in whole})
    seconds = sum(clip_dur.values())
    splits = {k[len("split:"):]: dict(sorted(v.items())) for k, v in q.counts.items() if k.startswith("split:")}
    density = (lambda n: round(n / seconds, 2) if seconds > 0 else None)
    n = sums["questions"]
    return {
        "source": name, "questions": n, "videos": len(per_key),
        "questions_per_video": round(n / len(per_key), 3),
        "questions_per_video_values": list(per_key.values()),
        "clip_durations_values": list(clip_dur.values()),
        "clip_duration_mean_s": round(seconds / len(clip_dur), 3) if clip_dur else None,
        "video_seconds": round(seconds, 3),
        "annotation_density": {"question characters / s": density(sums["chars"]),
                               "question + option characters / s": density(sums["chars"] + sums["option_chars"]),
                               "question words / s": density(sums["words"])},
        "categories_per_split": dict(sorted(splits.items())),
        "release": MOTIONBENCH_RELEASE,
    }


def imove_it_statistics(root: OutputRoot, folds: _Folds | None = None) -> dict[str, Any] | None:
    """The counts iMOVE gives for iMOVE-IT (objects, object categories, samples per task, videos), over the
    ``tasks`` table's kept samples. An object is an ``instance_id``; its category is its label."""
    import pyarrow as pa
    import pyarrow.compute as pc

    folds = folds or _Folds(root)
    t = folds("tasks")
    samples = t.counts["status"]["ok"]
    if not samples or not t.values["objects"]:
        return None
    objects = pa.concat_tables(t.values["objects"]).group_by(["instance_id", "label"]).aggregate([])
    n_objects = pc.count_distinct(objects["instance_id"]).as_py()
    categories = collections.Counter(dict(_value_counts(objects["label"])))
    videos = pc.unique(_column(t.values["videos"]))
    clips = pc.unique(_column(t.values["clips"]))
    known = list(folds.ingest_durations(videos.to_pylist()).values())
    return {
        "samples": samples, "objects": n_objects, "categories": len(categories),
        "objects_per_category": round(n_objects / len(categories), 3),
        "samples_per_task": dict(sorted(t.counts["task"].items())),
        "videos": len(videos), "clips": len(clips),
        "mean_video_duration_s": round(sum(known) / len(known), 3) if known else None,
        "top_categories": dict(_top(categories, 10)),
        "release": IMOVE_IT_RELEASE,
    }


def render_html(data: dict[str, Any]) -> str:
    st = data["status"]
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(s['stage'])}</td><td>{s['complete']}/{s['shards_expected']}</td><td>{s['stale']}</td>"
        f"<td>{s['pending']}</td><td>{s['failed']}</td><td>{s['rows_ok']}</td><td>{s['rows_error']}</td>"
        f"<td>{s['rows_skipped']}</td></tr>" for s in st["stages"])
    drops = "".join(
        f"<h3>{e(stage)}</h3><table><tr><th>cause</th><th>rows</th><th>one message as written</th></tr>"
        + "".join(f"<tr><td>{e(g['reason'])}</td><td>{g['count']}</td><td class='ex'>{e(g['example'])}</td></tr>"
                  for g in groups) + "</table>"
        for stage, groups in data["drop_reasons"].items())
    stats = _stats_html(data)
    plots = "".join(f"<figure><img src='{src}' alt='{e(name)}'><figcaption>{e(name)}</figcaption></figure>"
                    for name, src in data["plots"].items())
    numbers = "".join(f"<li>{e(k)}: {v}</li>" for k, v in data["numbers"].items())
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>motionforge report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:8px}}td.ex{{text-align:left;color:#666;font-size:.85em}}</style></head><body>
<h1>motionforge dataset report</h1><p>{e(st['out'])} &middot; {st['shards']} shards &middot; generated {now}</p>
<h2>Stages</h2><table><tr><th>stage</th><th>complete</th><th>stale</th><th>pending</th><th>failed</th>
<th>rows ok</th><th>error</th><th>skipped</th></tr>{rows}</table>
<h2>Numbers</h2><ul>{numbers}</ul>
{stats}
<h2>Distributions</h2>{plots or '<p>no data yet</p>'}
<h2>Drop and error reasons</h2>{drops or '<p>none</p>'}
</body></html>"""


def _stats_html(data: dict[str, Any]) -> str:
    e = html.escape
    out = []
    mb = data.get("motionbench")
    if mb:
        rel = mb["release"]
        dens = "".join(f"<tr><td>{e(k)}</td><td>{'-' if v is None else v}</td></tr>" for k, v in mb["annotation_density"].items())
        splits = sorted({s for v in mb["categories_per_split"].values() for s in v})
        cats = "".join(f"<tr><td>{e(c)}</td>" + "".join(f"<td>{v.get(s, 0)}</td>" for s in splits) + "</tr>"
                       for c, v in mb["categories_per_split"].items())
        out.append(
            f"<h2>MotionBench statistics</h2><p>over {mb['questions']} questions from <code>{e(mb['source'])}</code> "
            f"(the release: {rel['questions']} questions, {rel['videos']} videos)</p>"
            f"<ul><li>videos (clips): {mb['videos']}</li><li>questions per video: {mb['questions_per_video']}</li>"
            f"<li>mean clip duration: {mb['clip_duration_mean_s']} s over {mb['video_seconds']} s of video</li></ul>"
            f"<h3>Annotation density (total length of questions / video duration; the release: {rel['annotation_density']})</h3>"
            f"<p>The paper does not say how length is counted; three ways:</p><table>{dens}</table>"
            f"<h3>Categories per split</h3><table><tr><th>category</th>" + "".join(f"<th>{e(s)}</th>" for s in splits)
            + f"</tr>{cats}</table>")
    im = data.get("imove_it")
    if im:
        rel = im["release"]
        tasks = "".join(f"<tr><td>{e(k)}</td><td>{v}</td><td>{rel['samples_per_task'].get(k, '-')}</td></tr>"
                        for k, v in im["samples_per_task"].items())
        out.append(
            "<h2>iMOVE-IT statistics</h2><table><tr><th></th><th>this run</th><th>the release</th></tr>"
            f"<tr><td>objects (instances with samples)</td><td>{im['objects']}</td><td>{rel['objects']}</td></tr>"
            f"<tr><td>object categories</td><td>{im['categories']}</td><td>{rel['categories']}</td></tr>"
            f"<tr><td>objects per category</td><td>{im['objects_per_category']}</td><td>{rel['objects_per_category']}</td></tr>"
            f"<tr><td>videos</td><td>{im['videos']}</td><td>{rel['videos']}</td></tr>"
            f"<tr><td>mean video duration (s)</td><td>{im['mean_video_duration_s'] if im['mean_video_duration_s'] is not None else '-'}</td>"
            f"<td>{rel['mean_video_duration_s']}</td></tr>"
            f"<tr><th colspan=3>samples per task</th></tr>{tasks}</table>")
    return "".join(out)


REPORT_URL_ENV = "MOTIONFORGE_REPORT_URL"


def summary_markdown(data: dict[str, Any], out: str, report_path: str | Path | None = None,
                     base_url: str | None = None) -> str:
    """The report's key numbers as markdown (for the Prefect UI, which cannot open local files): a link to the
    report served over HTTP when ``base_url`` (a running ``motionforge review serve``) is known, the numbers
    MotionBench and iMOVE report for themselves, and the top drop causes per stage."""
    md = []
    if base_url:
        md.append(f"[dataset report]({base_url.rstrip('/')}/report) (served by `motionforge review serve`)")
    else:
        where = f" written to `{report_path}`;" if report_path else ""
        md.append(f"dataset report:{where} open it in a browser with `motionforge review serve --out {out}` "
                  f"and http://127.0.0.1:8765/report (set {REPORT_URL_ENV} to that server's address to get a link "
                  "here)")
    mb = data.get("motionbench")
    if mb:
        dens = mb["annotation_density"]
        md += ["", f"**MotionBench** ({mb['source']}): {mb['questions']} questions over {mb['videos']} clips, "
               f"{mb['questions_per_video']} per clip, mean clip {mb['clip_duration_mean_s']} s; annotation density "
               + ", ".join(f"{v} {k}" for k, v in dens.items()) + f" (release: {mb['release']['annotation_density']})",
               "", "| category | " + " | ".join(sorted({s for v in mb['categories_per_split'].values() for s in v})) + " |"]
        splits = sorted({s for v in mb["categories_per_split"].values() for s in v})
        md.append("|---|" + "---|" * len(splits))
        md += [f"| {c} | " + " | ".join(str(v.get(s, 0)) for s in splits) + " |" for c, v in mb["categories_per_split"].items()]
    im = data.get("imove_it")
    if im:
        md += ["", f"**iMOVE-IT**: {im['objects']} objects in {im['categories']} categories, {im['samples']} samples "
               "(" + ", ".join(f"{k} {v}" for k, v in im["samples_per_task"].items()) + f") from {im['videos']} videos"]
    if data["drop_reasons"]:
        md += ["", "| stage | top drop / error causes |", "|---|---|"]
        for stage, groups in data["drop_reasons"].items():
            causes = "; ".join(f"{g['reason']} (x{g['count']})" for g in groups[:3]).replace("|", "/")
            md.append(f"| {stage} | {causes} |")
    return "\n".join(md)


def write_report(out: str, to: str | Path | None = None, data: dict[str, Any] | None = None) -> Path:
    root = OutputRoot(out)
    page = render_html(data if data is not None else collect(out))
    if to is None:
        if not root.is_local:
            raise ValueError("for a remote output root, give a local --to path for the report")
        to = Path(root.path("_report", "index.html"))
    to = Path(to)
    to.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(to, page)
    return to


def write_text_atomic(to: Path, text: str) -> None:
    """Write beside ``to`` under a temp name, fsync, then rename over it: a full disk or a kill leaves the old
    report (or none), never a cut one."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{to.name}.partial-", dir=to.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, to)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
