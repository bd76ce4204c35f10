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


def write_clips(clips: Iterable[ClipSource], media_dir: str | Path) -> tuple[dict[str, str], dict[str, str]]:
    """Write every distinct clip once into ``media_dir`` (an export's own folder: ``.mp4`` files there that are
    not wanted any more are removed). Returns (name -> "copy" | "reencode" | "file", name -> error message).

    A clip that cannot be written (source missing, ffmpeg failure, a zero-length span) is reported in the
    error map, not raised, so one bad source loses only its own samples.
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
    keyframes: dict[str, list[float]] = {}
    for name, c in sorted(by_name.items()):
        dst = media_dir / name
        try:
            if not os.path.isfile(c.src):
                raise ClipCutError(f"source video not found: {c.src}")
            if c.start_s is None and c.end_s is None:
                tmp = dst.with_name(f".{dst.name}.part")
                shutil.copyfile(c.src, tmp)
                os.replace(tmp, dst)
                done[name] = "file"
                continue
            if c.start_s is None or c.end_s is None:
                raise ValueError(f"clip {name}: give both start_s and end_s or neither, got {c.start_s}, {c.end_s}")
            if c.src not in keyframes:
                try:
                    keyframes[c.src] = keyframe_times(c.src)
                except Exception:  # noqa: BLE001 -- without keyframe times the clip is re-encoded, always correct
                    keyframes[c.src] = []
            done[name] = cut_clip(c.src, dst, float(c.start_s), float(c.end_s), keyframes[c.src])
        except (ClipCutError, ValueError, OSError) as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    return done, errors


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
