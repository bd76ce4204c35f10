"""The MotionBench release folder: what THUDM/MotionBench's scorer and lmms-eval's ``motionbench`` task read.

Folder layout (``DIR``)::

    DIR/video_info.meta.jsonl   one line per QUESTION (see below)
    DIR/test_answers.json       uid -> letter for the test split (its qa answers are "NA" in the meta file)
    DIR/videos/<key>.mp4        one file per clip, cut so t=0 is the clip's start
    DIR/export_errors.json      only when some clip could not be written: clip -> reason (its questions left out)

Each meta line has the released fields ``key`` (the clip), ``video_path`` (``<key>.mp4``: like the release, a
bare file name; lmms-eval joins it to ``$MOTIONBENCH_VIDEO_DIR``, ``motionforge eval run`` to ``--videos``),
``video_type``, ``question_type`` (the category's full name) and ``qa`` with exactly ONE question
(``uid``, ``question`` with the ``A. ...`` option lines, ``answer``).

Why one question per line (several lines share a ``key`` and a clip file):

* both tools read the category only from the line-level ``question_type``, so a line that mixed categories
  would lose them; with one question per line every question's category is exact;
* the official ``compute_accuracy`` wraps the line's ``question_type`` in a list once per answered qa, so a
  second answered, non-``NA`` qa in the same line crashes it (``TypeError: unhashable type: 'list'``); a line
  with one qa is read without error.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Sequence

from schemas.motionbench import BenchmarkQuestion
from stages.export.media import ClipSource, safe_name, write_clips, write_errors, write_text_atomic
from stages.shared.motionbench_format import NA, format_question

META_FILE = "video_info.meta.jsonl"
ANSWER_KEY_FILE = "test_answers.json"
VIDEOS_DIR = "videos"
ERRORS_FILE = "export_errors.json"


def clip_file_name(key: str) -> str:
    return f"{safe_name(key)}.mp4"


def clip_source(row: BenchmarkQuestion) -> ClipSource:
    """The clip a question is about: the finalize row's file, cut to its span when it has one."""
    return ClipSource(name=clip_file_name(row.key), src=row.video_path, start_s=row.start_s, end_s=row.end_s)


def meta_lines(rows: Iterable[BenchmarkQuestion]) -> tuple[list[dict], dict[str, str]]:
    """(meta lines, one per question that goes out; test answer key uid -> letter). Rows not ``ok`` are left
    out. Test answers are ``NA`` in the line and go to the key."""
    lines: list[dict] = []
    key_out: dict[str, str] = {}
    seen: set[str] = set()
    for r in rows:
        if not r.ok:
            continue
        if r.question_id in seen:
            raise ValueError(f"question {r.question_id} appears twice; uids must be unique in a release")
        seen.add(r.question_id)
        hidden = r.split == "test"
        lines.append({"key": r.key, "video_path": clip_file_name(r.key), "video_type": r.video_type,
                      "question_type": r.question_type,
                      "qa": [{"uid": r.question_id, "question": format_question(r.question, r.options),
                              "answer": NA if hidden else r.answer}]})
        if hidden:
            key_out[r.question_id] = r.answer
    return lines, key_out


@dataclasses.dataclass(frozen=True)
class ReleaseExport:
    meta: Path
    answer_key: Path
    videos: Path
    questions: int  # lines written
    clips: int  # clip files written
    dev: int
    test: int
    dropped: dict[str, str]  # question uid -> why it was left out (its clip could not be written)


def export_release(rows: Sequence[BenchmarkQuestion], out_dir: str | Path, workers: int | None = None) -> ReleaseExport:
    """Write the release folder (see the module docstring). Questions whose clip cannot be written are left
    out and listed, with the reason, in ``export_errors.json``. ``workers``: clips cut at once
    (:func:`stages.export.media.write_clips`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ok_rows = [r for r in rows if r.ok]
    sources: dict[str, ClipSource] = {}
    for r in ok_rows:
        src = clip_source(r)
        prev = sources.setdefault(src.name, src)
        if prev != src:
            raise ValueError(f"clip {r.key}: questions disagree on its file or span ({prev} vs {src})")
    _, errors = write_clips(sources.values(), out / VIDEOS_DIR, workers=workers)
    dropped = {r.question_id: errors[clip_file_name(r.key)] for r in ok_rows if clip_file_name(r.key) in errors}
    kept = [r for r in ok_rows if r.question_id not in dropped]
    lines, key = meta_lines(kept)
    meta = out / META_FILE
    write_text_atomic(meta, "".join(json.dumps(ln, ensure_ascii=False) + "\n" for ln in lines))
    answers = out / ANSWER_KEY_FILE
    write_text_atomic(answers, json.dumps(key, indent=1, sort_keys=True) + "\n")
    write_errors(out / ERRORS_FILE, {"clips": errors, "questions_left_out": dropped} if errors else None)
    return ReleaseExport(meta=meta, answer_key=answers, videos=out / VIDEOS_DIR, questions=len(lines),
                         clips=len(sources) - len(errors), dev=sum(1 for r in kept if r.split == "dev"),
                         test=sum(1 for r in kept if r.split == "test"), dropped=dropped)

