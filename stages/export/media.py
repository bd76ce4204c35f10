"""Clip files for exports: each exported clip is its own file with t=0 at the clip's start, so a tool that
reads the whole file sees exactly the frames the labels describe, and a copied export folder needs nothing
from the machine that made it.

The cut itself is :func:`stages.scenes.cut_clip` (ffmpeg; stream copy when the span starts on a keyframe and
the end can be hit exactly, else a libx264 re-encode from the exact frame). A source that is already the
clip (a file the scenes stage cut, or a whole synthetic video) is copied.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from stages.scenes import ClipCutError, cut_clip, keyframe_times

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(key: str) -> str:
    """A file-name-safe form of a clip key (uuids pass unchanged)."""
    name = _SAFE.sub("_", str(key)).strip("._")
    if not name:
        raise ValueError(f"clip key {key!r} gives an empty file name")
    return name


@dataclasses.dataclass(frozen=True)
class ClipSource:
    """One clip to write: ``src[start_s:end_s]`` (both None: the whole file) to ``<dir>/<name>``."""

    name: str  # file name inside the export's media folder, e.g. "<clip_id>.mp4"
    src: str
    start_s: float | None = None
    end_s: float | None = None


def clip_index_path(media_dir: Path) -> Path:
    """Beside the media folder (which holds only the clips a consumer reads): one line per clip written."""
    return media_dir.with_name(f".{media_dir.name}.clips.jsonl")


def _stamp(path: str) -> dict | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _index_entry(c: ClipSource) -> dict:
    return {"name": c.name, "src": c.src, "start_s": c.start_s, "end_s": c.end_s, "src_stamp": _stamp(c.src)}


def _read_index(path: Path) -> dict[str, dict]:
    """name -> the last line written for it (a line cut by a crash is ignored)."""
    out: dict[str, dict] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return out
    for line in lines:
        try:
            entry = json.loads(line)
            out[entry["name"]] = entry
        except (ValueError, KeyError, TypeError):
            continue
    return out


def export_workers() -> int:
    """Clips cut at once: one ffmpeg per core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def write_clips(clips: Iterable[ClipSource], media_dir: str | Path,
                workers: int | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Write every distinct clip once into ``media_dir`` (an export's own folder: ``.mp4`` files there that are
    not wanted any more are removed). Returns (name -> "copy" | "reencode" | "file", name -> error message).

    A clip that cannot be written (source missing, ffmpeg failure, a zero-length span) is reported in the
    error map, not raised, so one bad source loses only its own samples.

    Sources are cut ``workers`` at a time (default: one per core), each source's clips one after another with
    its keyframe times looked up once. Each clip written is logged in :func:`clip_index_path` with its
    source's size and mtime; a later export into the same folder (or one resumed after a crash) keeps a clip
    whose file, source, span and source stamp are unchanged instead of cutting it again.
    """
    media_dir = Path(media_dir)
    media_dir.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    errors: dict[str, str] = {}
    by_name: dict[str, ClipSource] = {}
    for c in clips:
        prev = by_name.get(c.name)
        if prev is not None and prev != c:
            raise ValueError(f"two different clips would be written as {c.name}: {prev} and {c}")
        by_name[c.name] = c
    for old in media_dir.glob("*.mp4"):  # clips of an earlier export into this folder that are no longer wanted
        if old.name not in by_name:
            old.unlink()
    index_path = clip_index_path(media_dir)
    index = _read_index(index_path)
    todo: dict[str, list[tuple[str, ClipSource]]] = {}
    for name, c in sorted(by_name.items()):
        entry = index.get(name)
        want = _index_entry(c)
        if (entry is not None and want["src_stamp"] is not None and (media_dir / name).is_file()
                and {k: entry.get(k) for k in want} == want):
            done[name] = entry.get("mode", "kept")
        else:
            todo.setdefault(c.src, []).append((name, c))
    # the index keeps only the clips kept above; those cut below are appended as each one lands
    kept_lines = "".join(json.dumps(index[n]) + "\n" for n in sorted(done))
    write_text_atomic(index_path, kept_lines)
    lock = threading.Lock()

    def cut_source(src: str, items: list[tuple[str, ClipSource]]) -> None:
        keyframes: list[float] | None = None
        for name, c in items:
            dst = media_dir / name
            try:
                if not os.path.isfile(c.src):
                    raise ClipCutError(f"source video not found: {c.src}")
                if c.start_s is None and c.end_s is None:
                    tmp = dst.with_name(f".{dst.name}.part")
                    shutil.copyfile(c.src, tmp)
                    os.replace(tmp, dst)
                    mode = "file"
                elif c.start_s is None or c.end_s is None:
                    raise ValueError(f"clip {name}: give both start_s and end_s or neither, got {c.start_s}, {c.end_s}")
                else:
                    if keyframes is None:
                        try:
                            keyframes = keyframe_times(c.src)
                        except Exception:  # noqa: BLE001 -- without keyframe times the clip is re-encoded, always correct
                            keyframes = []
                    mode = cut_clip(c.src, dst, float(c.start_s), float(c.end_s), keyframes)
            except (ClipCutError, ValueError, OSError) as exc:
                with lock:
                    errors[name] = f"{type(exc).__name__}: {exc}"
                continue
            with lock:
                done[name] = mode
                with open(index_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({**_index_entry(c), "mode": mode}) + "\n")

    n = max(1, min(workers or export_workers(), len(todo)))
    with ThreadPoolExecutor(n, thread_name_prefix="cut-clips") as pool:  # ffmpeg runs outside the GIL
        for future in [pool.submit(cut_source, src, items) for src, items in todo.items()]:
            future.result()
    return dict(sorted(done.items())), dict(sorted(errors.items()))


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path`` and rename it over ``path`` (readers never see half a file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_errors(path: Path, report: dict | None) -> None:
    """``export_errors.json``: the report when something was left out, else no file (an old one is removed)."""
    if report:
        write_text_atomic(path, json.dumps(report, indent=1, sort_keys=True) + "\n")
    elif path.exists():
        path.unlink()
