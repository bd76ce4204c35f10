"""Training samples: read, split, fingerprint, and the torch dataset that decodes their frames.

Sources (:class:`stages.training.config.DataSource`): an output root's ``tasks`` table, an ``export imove-it``
JSONL, or any LLaVA/ShareGPT-style conversation JSONL mixed in. iMOVE-IT samples are split into train and
held-out by clip (a hash of ``clip_id`` and the split seed), so no clip is seen on both sides.

Frames are sampled as iMOVE does: the clip is cut into N equal segments and one frame is taken per segment,
at a random time inside it in training and at its centre in evaluation. The random time of a sample is a
function of (seed, epoch, sample id), not of a global random state: a resumed run and every data-parallel
process see the same frames for the same sample.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from typing import Any, Sequence

import numpy as np

from stages.training.config import DataConfig, DataSource

SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class TrainSample:
    sample_id: str
    conversations: tuple[tuple[str, str], ...]  # (role "human" | "gpt", text); "<video>" marks the clip
    video_path: str | None = None
    clip_start_s: float = 0.0
    clip_end_s: float | None = None
    task: str | None = None
    clip_id: str | None = None
    # iMOVE-IT ground truth, kept for evaluation
    duration_s: float | None = None
    width: int | None = None
    height: int | None = None
    t1_s: float | None = None
    t2_s: float | None = None
    box1_xyxy_px: tuple[float, ...] | None = None
    box2_xyxy_px: tuple[float, ...] | None = None
    dynamic_caption: str | None = None
    source: str = ""


def _conv(turns: Sequence[dict], where: str) -> tuple[tuple[str, str], ...]:
    out = []
    for t in turns:
        role = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt", "system": "system"}.get(
            str(t.get("from", t.get("role", ""))))
        if role is None:
            raise ValueError(f"{where}: unknown conversation role {t.get('from', t.get('role'))!r}")
        out.append((role, str(t.get("value", t.get("content", "")))))
    if not any(r == "gpt" for r, _ in out):
        raise ValueError(f"{where}: the conversation has no assistant turn to learn from")
    return tuple(out)


def _resolve(path: str | None, root: str | None) -> str | None:
    if path is None or root is None or os.path.isabs(path) or "://" in path:
        return path
    return os.path.join(root, path)


TASKS_COLUMNS = ("sample_id", "conversations", "video_path", "clip_start_s", "clip_end_s", "task", "clip_id",
                 "duration_s", "width", "height", "t1_s", "t2_s", "box1_xyxy_px", "box2_xyxy_px", "dynamic_caption",
                 "status")


def _from_tasks_row(row: dict, src: DataSource) -> TrainSample:
    return TrainSample(
        sample_id=row["sample_id"], conversations=_conv(row["conversations"], row["sample_id"]),
        video_path=_resolve(row["video_path"], src.video_root), clip_start_s=row["clip_start_s"],
        clip_end_s=row["clip_end_s"], task=row["task"], clip_id=row["clip_id"], duration_s=row["duration_s"],
        width=row["width"], height=row["height"], t1_s=row["t1_s"], t2_s=row["t2_s"],
        box1_xyxy_px=tuple(row["box1_xyxy_px"]), box2_xyxy_px=tuple(row["box2_xyxy_px"]),
        dynamic_caption=row["dynamic_caption"], source=src.path)


def _read_jsonl(path: str) -> list[dict]:
    import fsspec

    rows = []
    with fsspec.open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: line {n} is not JSON ({exc.msg})") from None
    return rows


def _folder_of(path: str) -> str | None:
    """Relative media paths in a JSONL resolve against its folder (the `export imove-it` layout: DIR/videos/)."""
    return None if "://" in path else os.path.dirname(os.path.abspath(path))


def _from_jsonl_row(row: dict, src: DataSource, n: int) -> TrainSample:
    where = f"{src.path}: line {n}"
    conv = row.get("conversations") or row.get("messages")
    if not conv:
        raise ValueError(f"{where}: no 'conversations'")
    meta = row.get("meta") or {}
    video = row.get("video")
    if video is None and row.get("videos"):
        video = row["videos"][0]  # ShareGPT layout: one clip per sample
    start = float(row.get("clip_start_s") or 0.0)
    end = None if row.get("clip_end_s") is None else float(row["clip_end_s"])
    if end is None and meta.get("duration_s") is not None:
        end = start + float(meta["duration_s"])  # `export imove-it` cuts each clip: t=0 is the clip start
    truth: dict = {}
    if end is not None and all(k in meta for k in ("t1_token", "t2_token", "box1_tokens", "box2_tokens")):
        # an `export imove-it` line keeps the targets as tokens only: times come back to within half a token
        # (3.2.2), boxes stay on the 0-1000 grid (box IoU does not change when both axes are rescaled)
        from stages.shared.relative_tokens import N_SPACE, dequantize_time

        dur = end - start
        truth = dict(duration_s=dur, width=N_SPACE, height=N_SPACE,
                     t1_s=dequantize_time(meta["t1_token"], dur), t2_s=dequantize_time(meta["t2_token"], dur),
                     box1_xyxy_px=tuple(float(v) for v in meta["box1_tokens"]),
                     box2_xyxy_px=tuple(float(v) for v in meta["box2_tokens"]))
        gpt = [t for t in conv if str(t.get("from", t.get("role"))) in ("gpt", "assistant")]
        if row.get("task") == "dynamic_captioning" and gpt:
            truth["dynamic_caption"] = str(gpt[0].get("value", gpt[0].get("content", "")))
    return TrainSample(
        sample_id=str(row.get("id") or f"{hashlib.sha256(src.path.encode()).hexdigest()[:8]}-{n}"),
        conversations=_conv(conv, where), video_path=_resolve(video, src.video_root or _folder_of(src.path)),
        clip_start_s=start,
        clip_end_s=end, task=row.get("task"), clip_id=meta.get("clip_id"), source=src.path, **truth)


def read_source(src: DataSource) -> list[TrainSample]:
    """Every usable sample of one source, in a stable order (sample id)."""
    p = src.path
    if src.kind == "imove_it" and not p.endswith((".jsonl", ".json")):
        import pyarrow.compute as pc

        from schemas.imove_it import SCHEMA
        from storage.root import OutputRoot

        samples = []
        for _, table in OutputRoot(p).iter_stage("tasks", columns=TASKS_COLUMNS, schema=SCHEMA):
            # a shard at a time, only the columns a sample keeps: a whole tasks table as row dicts is several
            # times the samples' own size, in every data-parallel process
            table = table.filter(pc.fill_null(pc.equal(table["status"], "ok"), False))
            samples += [_from_tasks_row(r, src) for r in table.to_pylist()]
    else:
        samples = [_from_jsonl_row(r, src, n) for n, r in enumerate(_read_jsonl(p), 1)]
    if src.tasks:
        samples = [s for s in samples if s.task in src.tasks]
    return sorted(samples, key=lambda s: s.sample_id)


def split_of(sample: TrainSample, eval_fraction: float, seed: int) -> str:
    """``eval`` for the held-out share of iMOVE-IT clips, else ``train``; mixed-in data always trains."""
    if sample.clip_id is None or eval_fraction <= 0:
        return "train"
    h = int(hashlib.sha256(f"{seed}:{sample.clip_id}".encode()).hexdigest()[:12], 16) / float(16 ** 12)
    return "eval" if h < eval_fraction else "train"


def load_samples(cfg: DataConfig, split: str) -> list[TrainSample]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not cfg.sources:
        raise ValueError("data.sources is empty: name an output root or export JSONL to train on")
    out: list[TrainSample] = []
    for src in cfg.sources:
        picked = [s for s in read_source(src)
                  if split_of(s, cfg.eval_fraction if src.kind == "imove_it" else 0.0, cfg.split_seed) == split]
        if src.max_samples:
            picked = picked[:src.max_samples]
        out += picked * (src.repeat if split == "train" else 1)
    return out


def data_fingerprint(samples: Sequence[TrainSample]) -> str:
    """Hash of the samples a run trains on, in order: ids, conversations, video paths and spans."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.sample_id, s.conversations, s.video_path, s.clip_start_s, s.clip_end_s]).encode())
    return h.hexdigest()[:16]


# -- frames -----------------------------------------------------------------------------------------------------
def segment_times(start_s: float, end_s: float, n: int, rng: random.Random | None) -> list[float]:
    """One time per segment of N equal segments: uniform inside the segment with ``rng``, else its centre."""
    step = (end_s - start_s) / n
    if rng is None:
        return [start_s + (i + 0.5) * step for i in range(n)]
    return [start_s + (i + rng.random()) * step for i in range(n)]


def sample_rng(seed: int, epoch: int, sample_id: str) -> random.Random:
    return random.Random(int(hashlib.sha256(f"{seed}:{epoch}:{sample_id}".encode()).hexdigest()[:16], 16))


def frames_at(path: str, start_s: float, end_s: float | None, times: Sequence[float],
              short_side: int | None) -> list[np.ndarray]:
    """The decoded frame nearest to each of ``times`` (sorted), streaming through the span once."""
    from experts.video import iter_frames

    best: list[tuple[float, np.ndarray] | None] = [None] * len(times)
    for fr in iter_frames(path, start_s, end_s, short_side=short_side):
        for i, t in enumerate(times):
            d = abs(fr.t_s - t)
            if best[i] is None or d < best[i][0]:
                best[i] = (d, fr.image)
    if any(b is None for b in best):
        raise ValueError(f"{path}: no frame decoded in [{start_s:.3f}, {end_s}]s")
    return [b[1] for b in best]  # type: ignore[index]


def clip_end(sample: TrainSample) -> float:
    if sample.clip_end_s is not None:
        return sample.clip_end_s
    from experts.video import probe

    return probe(sample.video_path, check_decode=False).duration_s


class VideoConversationDataset:
    """Map-style dataset of (sample, frames) items; frames are decoded on access (in dataloader workers)."""

    def __init__(self, samples: Sequence[TrainSample], num_frames: int, short_side: int | None,
                 train: bool, seed: int = 0) -> None:
        self.samples = list(samples)
        self.num_frames = num_frames
        self.short_side = short_side
        self.train = train
        self.seed = seed
        self.epoch = 0  # set by the trainer's epoch callback; workers are re-created each epoch

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        frames = None
        if s.video_path:
            end = clip_end(s)
            rng = sample_rng(self.seed, self.epoch, s.sample_id) if self.train else None
            times = segment_times(s.clip_start_s, end, self.num_frames, rng)
            try:
                frames = np.stack(frames_at(s.video_path, s.clip_start_s, end, times, self.short_side))
            except Exception as exc:  # noqa: BLE001 -- say which sample and file, then stop the run
                raise ValueError(f"sample {s.sample_id} ({s.source}): cannot read frames of {s.video_path} "
                                 f"[{s.clip_start_s:.2f}, {end:.2f}]s: {type(exc).__name__}: {exc}; fix or remove "
                                 "the file, or drop the sample from the data, then run again (the run resumes)") from exc
            return {"sample": s, "frames": frames, "duration_s": end - s.clip_start_s}
        return {"sample": s, "frames": None, "duration_s": None}
