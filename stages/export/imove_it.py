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
"""
from __future__ import annotations

import dataclasses
import json
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


def export_samples(rows: Sequence[dict], to: str | Path, formats: Iterable[str] = FORMATS,
                   workers: int | None = None) -> ImoveExport:
    """Write the export folder for ``rows`` (``tasks`` rows as dicts, status ``ok`` only); ``workers``: clips
    cut at once (:func:`stages.export.media.write_clips`)."""
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"unknown format(s) {bad}; choose from {', '.join(FORMATS)}")
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    sources: dict[str, ClipSource] = {}
    for r in rows:
        name = Path(clip_file(r["clip_id"])).name
        src = ClipSource(name=name, src=r["video_path"], start_s=r["clip_start_s"], end_s=r["clip_end_s"])
        if sources.setdefault(name, src) != src:
            raise ValueError(f"clip {r['clip_id']}: samples disagree on its source or span")
    _, errors = write_clips(sources.values(), to / VIDEOS_DIR, workers=workers)
    dropped = {r["sample_id"]: errors[Path(clip_file(r["clip_id"])).name] for r in rows
               if Path(clip_file(r["clip_id"])).name in errors}
    for r in rows:
        if r["sample_id"] not in dropped:
            try:
                _turns(r)
            except ValueError as exc:
                dropped[r["sample_id"]] = str(exc)
    kept = [r for r in rows if r["sample_id"] not in dropped]
    files = {}
    for fmt in formats:
        recs = [RECORD[fmt](r) for r in kept]
        path = to / FILES[fmt]
        if fmt == "llava":
            write_text_atomic(path, json.dumps(recs, ensure_ascii=False, indent=1) + "\n")
        else:
            write_text_atomic(path, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in recs))
        files[fmt] = path
    if "internvl" in formats:
        write_text_atomic(to / INTERNVL_META, json.dumps({DATASET_NAME: {
            "root": str(to.resolve()), "annotation": str((to / FILES["internvl"]).resolve()),
            "data_augment": False, "repeat_time": 1, "length": len(kept)}}, indent=1) + "\n")
    if "sharegpt" in formats:
        write_text_atomic(to / LLAMAFACTORY_INFO, json.dumps({DATASET_NAME: {
            "file_name": FILES["sharegpt"], "formatting": "sharegpt",
            "columns": {"messages": "messages", "videos": "videos"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                     "assistant_tag": "assistant"}}}, indent=1) + "\n")
    write_errors(to / ERRORS_FILE, {"clips": errors, "samples_left_out": dropped} if dropped else None)
    return ImoveExport(folder=to, files=files, samples=len(kept), clips=len(sources) - len(errors), dropped=dropped)


def ok_rows(table, tasks: Sequence[str] | None = None) -> list[dict]:
    """The ``ok`` rows of a ``tasks`` table (optionally only some tasks) as dicts, in sample-id order."""
    rows = [r for r in table.to_pylist() if r["status"] == "ok" and (not tasks or r["task"] in tasks)]
    return sorted(rows, key=lambda r: r["sample_id"])
