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


def _table(root: OutputRoot, stage: str):
    try:
        return root.read_stage(stage)
    except FileNotFoundError:
        return None


def _ok(table, col: str) -> list:
    if table is None or col not in table.column_names:
        return []
    return [v for v, s in zip(table[col].to_pylist(), table["status"].to_pylist()) if s == "ok" and v is not None]


def collect(out: str) -> dict[str, Any]:
    """Everything the page shows, as plain values (also useful for Prefect artifacts and tests)."""
    root = OutputRoot(out)
    st = root_status(out)
    data: dict[str, Any] = {"status": st, "drop_reasons": {}, "plots": {}, "numbers": {}}
    for s in st["stages"]:
        t = _table(root, s["stage"])
        if t is None:
            continue
        reasons = collections.Counter(
            (e or "").split(":")[0][:80] for e, stt in zip(t["error"].to_pylist(), t["status"].to_pylist()) if stt != "ok")
        if reasons:
            data["drop_reasons"][s["stage"]] = dict(reasons.most_common(10))
    clips = _table(root, "scenes")
    durations = _ok(clips, "duration_s")
    data["numbers"]["clips"] = len(durations)
    data["plots"]["clip durations"] = _hist(durations, "clip duration", "seconds")
    tags = _table(root, "tag")
    if tags is not None and "tags" in tags.column_names:
        c = collections.Counter(t["tag"] for row in _ok(tags, "tags") for t in row)
        data["plots"]["first-frame tags"] = _bars(dict(c), "RAM++ tags kept (first frames)")
    tracks = _table(root, "track")
    if tracks is not None:
        data["plots"]["instance categories"] = _bars(dict(collections.Counter(_ok(tracks, "label"))), "tracked instance categories")
    samples = _table(root, "tasks")
    if samples is not None:
        rows = [r for r in samples.to_pylist() if r["status"] == "ok"]
        data["numbers"]["imove_it_samples"] = len(rows)
        data["plots"]["iMOVE-IT tasks"] = _bars(dict(collections.Counter(r["task"] for r in rows)), "samples per task")
        data["plots"]["time intervals"] = _hist([r["t2_s"] - r["t1_s"] for r in rows], "instance motion interval (t2 - t1)", "seconds")
        data["plots"]["caption lengths"] = _hist([len(r["dynamic_caption"].split()) for r in rows if r["task"] == "dynamic_captioning"],
                                                  "dynamic caption length", "words")
    for name in ("finalize", "qgen"):
        q = _table(root, name)
        if q is not None and "category" in q.column_names:
            cats = collections.Counter(MB_CATEGORY_NAMES.get(c, c) for c in _ok(q, "category"))
            data["numbers"][f"{name}_questions"] = sum(cats.values())
            data["plots"][f"MotionBench categories ({name})"] = _bars(dict(cats), f"questions per category ({name})")
            if "answer" in q.column_names:
                data["plots"][f"answer letters ({name})"] = _bars(dict(collections.Counter(_ok(q, "answer"))), f"answer letters ({name})")
            break
    data["plots"] = {k: v for k, v in data["plots"].items() if v}
    return data


def render_html(data: dict[str, Any]) -> str:
    st = data["status"]
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(s['stage'])}</td><td>{s['complete']}/{s['shards_expected']}</td><td>{s['stale']}</td>"
        f"<td>{s['pending']}</td><td>{s['failed']}</td><td>{s['rows_ok']}</td><td>{s['rows_error']}</td>"
        f"<td>{s['rows_skipped']}</td></tr>" for s in st["stages"])
    drops = "".join(
        f"<h3>{e(stage)}</h3><ul>" + "".join(f"<li>{e(r or '(no reason)')} &times; {n}</li>" for r, n in reasons.items()) + "</ul>"
        for stage, reasons in data["drop_reasons"].items())
    plots = "".join(f"<figure><img src='{src}' alt='{e(name)}'><figcaption>{e(name)}</figcaption></figure>"
                    for name, src in data["plots"].items())
    numbers = "".join(f"<li>{e(k)}: {v}</li>" for k, v in data["numbers"].items())
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>motionforge report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:8px}}</style></head><body>
<h1>motionforge dataset report</h1><p>{e(st['out'])} &middot; {st['shards']} shards &middot; generated {now}</p>
<h2>Stages</h2><table><tr><th>stage</th><th>complete</th><th>stale</th><th>pending</th><th>failed</th>
<th>rows ok</th><th>error</th><th>skipped</th></tr>{rows}</table>
<h2>Numbers</h2><ul>{numbers}</ul>
<h2>Distributions</h2>{plots or '<p>no data yet</p>'}
<h2>Drop and error reasons</h2>{drops or '<p>none</p>'}
</body></html>"""


def write_report(out: str, to: str | Path | None = None) -> Path:
    root = OutputRoot(out)
    page = render_html(collect(out))
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
