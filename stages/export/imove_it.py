"""iMOVE-IT samples for the VLM trainers people fine-tune with, each sample's media a clip-aligned file.

Every sample's time tokens are relative to its clip (``<0>`` = clip start, ``<300>`` = clip end), so the file a
trainer reads must BE the clip: each clip is cut once into ``DIR/videos/<clip_id>.mp4`` (t=0 at the clip start,
:mod:`stages.export.media`) and samples name it by a path relative to ``DIR``. Formats (``--format``):

``internvl``  InternVL chat fine-tuning (iMOVE's base model): ``imove_it_internvl.jsonl``, one line
              ``{id, video, conversations: [{from: human|gpt, value}]}``, the first human turn starting with the
              exact ``<video>\\n`` (only that form is expanded to per-frame ``<image>`` tokens), plus the meta file
              ``imove_it_internvl_meta.json`` ``{name: {root, annotation, data_augment, repeat_time, length}}``
              whose ``root`` is ``DIR`` (the trainer joins ``root`` and ``video``; edit it if the folder moves).
``llava``     LLaVA-NeXT / LLaVA-Video: ``imove_it_llava.json``, a JSON LIST (what a plain ``--data_path`` reads)
              of ``{id, video, conversations}`` with ONE ``<image>`` placeholder (the whole video) at the start of
              the first human turn; ``<video>`` is never expanded there. Train with ``--video_folder DIR``.
``sharegpt``  LLaMA-Factory (ms-swift documents the same layout): ``imove_it_sharegpt.jsonl``,
              ``{id, messages: [{role: user|assistant, content}], videos: [path]}`` with one ``<video>`` per entry
              of ``videos``, plus LLaMA-Factory's
              ``dataset_info.json`` (``--dataset_dir DIR --dataset motionforge_imove_it``; media paths resolve
              against ``DIR``).

Samples whose clip cannot be cut, or whose turns do not alternate human / gpt, are left out and listed
with the reason in ``export_errors.json``.

From an output root (:class:`StageSamples`) the samples are read shard by shard, twice (the clips to cut,
then the records, written to every format's file as they are read), in shard order: the export holds the
clips, not the samples (a million-video root has millions).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import textwrap
from pathlib import Path
from typing import Iterable, Sequence

from stages.export.media import ClipSource, safe_name, write_clips, write_errors, write_text_atomic

FORMATS = ("internvl", "llava", "sharegpt")
VIDEOS_DIR = "videos"
DATASET_NAME = "motionforge_imove_it"
FILES = {"internvl": "imove_it_internvl.jsonl", "llava": "imove_it_llava.json", "sharegpt": "imove_it_sharegpt.jsonl"}
INTERNVL_META = "imove_it_internvl_meta.json"
LLAMAFACTORY_INFO = "dataset_info.json"
ERRORS_FILE = "export_errors.json"
VIDEO_TAG = "<video>"
IMAGE_TAG = "<image>"
ROLE = {"human": "user", "gpt": "assistant"}


def clip_file(clip_id: str) -> str:
    return f"{VIDEOS_DIR}/{safe_name(clip_id)}.mp4"


def _turns(row: dict) -> list[tuple[str, str]]:
    """(from, text) pairs with every video placeholder taken out of the text; checks the turn order."""
    turns = [(t["from"], t["value"]) for t in row["conversations"]]
    if not turns or len(turns) % 2 or any(f != ("human" if i % 2 == 0 else "gpt") for i, (f, _) in enumerate(turns)):
        raise ValueError(f"sample {row['sample_id']}: turns must alternate human, gpt, ... (got {[f for f, _ in turns]})")
    out = []
    for f, text in turns:
        text = text.replace(VIDEO_TAG + "\n", "").replace(VIDEO_TAG, "").replace(IMAGE_TAG, "")
        out.append((f, text.strip("\n")))
    return out


def internvl_record(row: dict) -> dict:
    turns = _turns(row)
    conv = [{"from": f, "value": (VIDEO_TAG + "\n" + v) if i == 0 else v} for i, (f, v) in enumerate(turns)]
    # ``meta`` (ignored by InternVL's loader, which reads id / video / conversations) keeps the targets as the
    # model sees them, so `motionforge train` / `eval imove-it` can score a held-out split read from this file.
    meta = {"clip_id": row["clip_id"], "duration_s": row["duration_s"], "t1_token": row["t1_token"],
            "t2_token": row["t2_token"], "box1_tokens": list(row["box1_tokens"]),
            "box2_tokens": list(row["box2_tokens"])}
    return {"id": row["sample_id"], "video": clip_file(row["clip_id"]), "conversations": conv, "task": row["task"],
            "meta": meta}


def llava_record(row: dict) -> dict:
    turns = _turns(row)
    conv = [{"from": f, "value": (IMAGE_TAG + "\n" + v) if i == 0 else v} for i, (f, v) in enumerate(turns)]
    return {"id": row["sample_id"], "video": clip_file(row["clip_id"]), "conversations": conv, "task": row["task"]}


def sharegpt_record(row: dict) -> dict:
    turns = _turns(row)
    msgs = [{"role": ROLE[f], "content": (VIDEO_TAG + v) if i == 0 else v} for i, (f, v) in enumerate(turns)]
    return {"id": row["sample_id"], "messages": msgs, "videos": [clip_file(row["clip_id"])], "task": row["task"]}


RECORD = {"internvl": internvl_record, "llava": llava_record, "sharegpt": sharegpt_record}


@dataclasses.dataclass(frozen=True)
class ImoveExport:
    folder: Path
    files: dict[str, Path]  # format -> data file
    samples: int
    clips: int
    dropped: dict[str, str]  # sample_id -> reason


class StageSamples:
    """The ``ok`` rows of an output root's ``tasks`` stage (only ``tasks`` of them, if given), as dicts, read
    shard by shard every time they are iterated."""

    def __init__(self, root, tasks: Sequence[str] | None = None):
        self.root, self.tasks = root, list(tasks or [])

    def __iter__(self):
        import pyarrow as pa
        import pyarrow.compute as pc

        from schemas.imove_it import SCHEMA

        for _, table in self.root.iter_stage("tasks", schema=SCHEMA):
            keep = pc.fill_null(pc.equal(table["status"], "ok"), False)
            if self.tasks:
                keep = pc.and_(keep, pc.is_in(table["task"], value_set=pa.array(self.tasks, pa.string())))
            yield from table.filter(keep).to_pylist()


class _RecordFiles:
    """One data file per format, written under temp names as records come and renamed in place by
    :meth:`commit`; the LLaVA file is the JSON list ``json.dumps(records, indent=1)`` would give."""

    def __init__(self, to: Path, formats: list[str]):
        self.paths = {fmt: to / FILES[fmt] for fmt in formats}
        self.tmp = {fmt: p.with_name(f".{p.name}.tmp-{os.getpid()}") for fmt, p in self.paths.items()}
        self.files = {fmt: open(t, "w", encoding="utf-8") for fmt, t in self.tmp.items()}
        self.n = 0

    def write(self, row: dict) -> None:
        for fmt, f in self.files.items():
            rec = json.dumps(RECORD[fmt](row), ensure_ascii=False, indent=1 if fmt == "llava" else None)
            if fmt == "llava":
                f.write(("[\n" if self.n == 0 else ",\n") + textwrap.indent(rec, " "))
            else:
                f.write(rec + "\n")
        self.n += 1

    def commit(self) -> dict[str, Path]:
        for fmt, f in self.files.items():
            if fmt == "llava":
                f.write("[]\n" if self.n == 0 else "\n]\n")
            f.close()
            os.replace(self.tmp[fmt], self.paths[fmt])
        return dict(self.paths)

    def discard(self) -> None:
        for fmt, f in self.files.items():
            f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp[fmt])


def export_samples(rows: Iterable[dict], to: str | Path, formats: Iterable[str] = FORMATS,
                   workers: int | None = None) -> ImoveExport:
    """Write the export folder for ``rows`` (``tasks`` rows as dicts, status ``ok`` only: a list, or a
    :class:`StageSamples` that reads them again for each pass); ``workers``: clips cut at once
    (:func:`stages.export.media.write_clips`)."""
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"unknown format(s) {bad}; choose from {', '.join(FORMATS)}")
    if iter(rows) is rows:  # a one-pass iterator: the two passes below need the rows twice
        rows = list(rows)
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    sources: dict[str, ClipSource] = {}
    dropped: dict[str, str] = {}
    for r in rows:  # pass 1: the clips to cut, and the samples whose turns no trainer can read
        name = Path(clip_file(r["clip_id"])).name
        src = ClipSource(name=name, src=r["video_path"], start_s=r["clip_start_s"], end_s=r["clip_end_s"])
        if sources.setdefault(name, src) != src:
            raise ValueError(f"clip {r['clip_id']}: samples disagree on its source or span")
        try:
            _turns(r)
        except ValueError as exc:
            dropped[r["sample_id"]] = str(exc)
    _, errors = write_clips(sources.values(), to / VIDEOS_DIR, workers=workers)
    out = _RecordFiles(to, formats)
    try:
        for r in rows:  # pass 2: every format's record of each sample kept
            clip_error = errors.get(Path(clip_file(r["clip_id"])).name)
            if clip_error is not None:
                dropped[r["sample_id"]] = clip_error
            elif r["sample_id"] not in dropped:
                out.write(r)
    except BaseException:
        out.discard()
        raise
    files = out.commit()
    if "internvl" in formats:
        write_text_atomic(to / INTERNVL_META, json.dumps({DATASET_NAME: {
            "root": str(to.resolve()), "annotation": str((to / FILES["internvl"]).resolve()),
            "data_augment": False, "repeat_time": 1, "length": out.n}}, indent=1) + "\n")
    if "sharegpt" in formats:
        write_text_atomic(to / LLAMAFACTORY_INFO, json.dumps({DATASET_NAME: {
            "file_name": FILES["sharegpt"], "formatting": "sharegpt",
            "columns": {"messages": "messages", "videos": "videos"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                     "assistant_tag": "assistant"}}}, indent=1) + "\n")
    write_errors(to / ERRORS_FILE, {"clips": errors, "samples_left_out": dropped} if dropped else None)
    return ImoveExport(folder=to, files=files, samples=out.n, clips=len(sources) - len(errors), dropped=dropped)


def ok_rows(table, tasks: Sequence[str] | None = None) -> list[dict]:
    """The ``ok`` rows of a ``tasks`` table (optionally only some tasks) as dicts, in sample-id order."""
    rows = [r for r in table.to_pylist() if r["status"] == "ok" and (not tasks or r["task"] in tasks)]
    return sorted(rows, key=lambda r: r["sample_id"])
