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

from stages.shared.reasons import group_reasons
from dashboards.status import root_status
from storage.root import OutputRoot

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


class _Tables:
    """``tables(stage)``: a stage's whole table, or None before it has run; each read once per report (the
    report looks at some stages several times, and reading every shard's file is most of its cost)."""

    def __init__(self, root: OutputRoot):
        self.root = root
        self._read: dict[str, Any] = {}

    def __call__(self, stage: str):
        if stage not in self._read:
            try:
                self._read[stage] = self.root.read_stage(stage)
            except FileNotFoundError:
                self._read[stage] = None
        return self._read[stage]


def _ok(table, col: str) -> list:
    if table is None or col not in table.column_names:
        return []
    return [v for v, s in zip(table[col].to_pylist(), table["status"].to_pylist()) if s == "ok" and v is not None]


def collect(out: str) -> dict[str, Any]:
    """Everything the page shows, as plain values (also useful for Prefect artifacts and tests)."""
    root = OutputRoot(out)
    tables = _Tables(root)
    st = root_status(out)
    data: dict[str, Any] = {"status": st, "drop_reasons": {}, "plots": {}, "numbers": {}}
    for s in st["stages"]:
        t = tables(s["stage"])
        if t is None:
            continue
        groups = group_reasons(e for e, stt in zip(t["error"].to_pylist(), t["status"].to_pylist()) if stt != "ok")
        if groups:
            data["drop_reasons"][s["stage"]] = groups
    clips = tables("scenes")
    durations = _ok(clips, "duration_s")
    data["numbers"]["clips"] = len(durations)
    data["plots"]["clip durations"] = _hist(durations, "clip duration", "seconds")
    tags = tables("tag")
    if tags is not None and "tags" in tags.column_names:
        c = collections.Counter(t["tag"] for row in _ok(tags, "tags") for t in row)
        data["plots"]["first-frame tags"] = _bars(dict(c), "RAM++ tags kept (first frames)")
    tracks = tables("track")
    if tracks is not None:
        data["plots"]["instance categories"] = _bars(dict(collections.Counter(_ok(tracks, "label"))), "tracked instance categories")
    samples = tables("tasks")
    if samples is not None:
        rows = [r for r in samples.to_pylist() if r["status"] == "ok"]
        data["numbers"]["imove_it_samples"] = len(rows)
        data["plots"]["iMOVE-IT tasks"] = _bars(dict(collections.Counter(r["task"] for r in rows)), "samples per task")
        data["plots"]["time intervals"] = _hist([r["t2_s"] - r["t1_s"] for r in rows], "instance motion interval (t2 - t1)", "seconds")
        data["plots"]["caption lengths"] = _hist([len(r["dynamic_caption"].split()) for r in rows if r["task"] == "dynamic_captioning"],
                                                  "dynamic caption length", "words")
    for name in ("finalize", "qgen"):
        q = tables(name)
        if q is not None and "category" in q.column_names:
            cats = collections.Counter(MB_CATEGORY_NAMES.get(c, c) for c in _ok(q, "category"))
            data["numbers"][f"{name}_questions"] = sum(cats.values())
            data["plots"][f"MotionBench categories ({name})"] = _bars(dict(cats), f"questions per category ({name})")
            if "answer" in q.column_names:
                data["plots"][f"answer letters ({name})"] = _bars(dict(collections.Counter(_ok(q, "answer"))), f"answer letters ({name})")
            break
    mb = motionbench_statistics(root, tables)
    if mb:
        data["motionbench"] = mb
        data["plots"]["MotionBench questions per video"] = _hist(mb["questions_per_video_values"], "questions per video",
                                                                 "questions", bins=max(1, min(20, max(mb["questions_per_video_values"]))))
        data["plots"]["MotionBench clip durations"] = _hist(mb["clip_durations_values"], "MotionBench clip duration", "seconds")
    im = imove_it_statistics(root, tables)
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


def _video_durations(tables: _Tables) -> dict[str, float]:
    t = tables("ingest")
    if t is None or "duration_s" not in t.column_names:
        return {}
    return {v: d for v, d, st in zip(t["video_id"].to_pylist(), t["duration_s"].to_pylist(), t["status"].to_pylist())
            if st == "ok" and d}


def motionbench_statistics(root: OutputRoot, tables: _Tables | None = None) -> dict[str, Any] | None:
    """The statistics MotionBench gives for itself (section 3.2, Fig. 2 and 3), over the benchmark's questions:
    ``finalize`` when it has run, else the questions the review kept, else qgen's.

    Annotation density is "total length of questions / video duration" (eq. 1). The paper does not say how
    length is counted; we count characters of the question text and, separately, of question plus options,
    and words, each over the summed duration of the distinct video clips the questions are about.
    """
    tables = tables or _Tables(root)
    rows, source = [], None
    for name in ("finalize", "review", "qgen"):
        t = tables(name)
        if t is not None and t.num_rows:
            rows = [r for r in t.to_pylist() if r["status"] == "ok" and r.get("question")]
            source = name
            if rows:
                break
    if not rows:
        return None
    whole = _video_durations(tables)
    clip_dur: dict[str, float] = {}
    per_video: collections.Counter = collections.Counter()
    for r in rows:
        key = r.get("key") or r.get("clip_id") or f"{r['video_id']}:{r.get('start_s')}:{r.get('end_s')}"
        per_video[key] += 1
        if r.get("start_s") is not None and r.get("end_s") is not None:
            clip_dur[key] = float(r["end_s"]) - float(r["start_s"])
        elif r["video_id"] in whole:
            clip_dur[key] = float(whole[r["video_id"]])
    seconds = sum(clip_dur.values())
    chars = sum(len(r["question"]) for r in rows)
    chars_opts = chars + sum(len(o) for r in rows for o in (r.get("options") or []))
    words = sum(len(r["question"].split()) for r in rows)
    splits: dict[str, dict[str, int]] = {}
    for r in rows:
        cat = MB_CATEGORY_NAMES.get(r.get("category"), r.get("category") or "?")
        split = r.get("split") or "(not split)"
        splits.setdefault(cat, {}).setdefault(split, 0)
        splits[cat][split] += 1
    density = (lambda n: round(n / seconds, 2) if seconds > 0 else None)
    qpv = list(per_video.values())
    return {
        "source": source, "questions": len(rows), "videos": len(per_video),
        "questions_per_video": round(len(rows) / len(per_video), 3),
        "questions_per_video_values": qpv,
        "clip_durations_values": list(clip_dur.values()),
        "clip_duration_mean_s": round(seconds / len(clip_dur), 3) if clip_dur else None,
        "video_seconds": round(seconds, 3),
        "annotation_density": {"question characters / s": density(chars),
                               "question + option characters / s": density(chars_opts),
                               "question words / s": density(words)},
        "categories_per_split": {c: dict(sorted(v.items())) for c, v in sorted(splits.items())},
        "release": MOTIONBENCH_RELEASE,
    }


def imove_it_statistics(root: OutputRoot, tables: _Tables | None = None) -> dict[str, Any] | None:
    """The counts iMOVE gives for iMOVE-IT (objects, object categories, samples per task, videos), over the
    ``tasks`` table's kept samples."""
    tables = tables or _Tables(root)
    t = tables("tasks")
    if t is None:
        return None
    rows = [r for r in t.to_pylist() if r["status"] == "ok"]
    if not rows:
        return None
    objects = {r["instance_id"]: r["label"] for r in rows}
    categories = collections.Counter(objects.values())
    videos = {r["video_id"] for r in rows}
    whole = _video_durations(tables)
    known = [whole[v] for v in videos if v in whole]
    return {
        "samples": len(rows), "objects": len(objects), "categories": len(categories),
        "objects_per_category": round(len(objects) / len(categories), 3),
        "samples_per_task": dict(sorted(collections.Counter(r["task"] for r in rows).items())),
        "videos": len(videos), "clips": len({r["clip_id"] for r in rows}),
        "mean_video_duration_s": round(sum(known) / len(known), 3) if known else None,
        "top_categories": dict(categories.most_common(10)),
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
