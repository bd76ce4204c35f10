"""Evaluate a trained checkpoint: load it (adapter on the base, or merged), answer iMOVE-IT held-out samples
or Charades-STA queries, score with :mod:`stages.evaluation.imove_it`.

A checkpoint is a training run's ``final/`` or ``checkpoints/checkpoint-N/`` folder; its
``motionforge_fingerprint.json`` holds the training config, so the base model, the model parts and the data
(and its held-out split) are known without asking. Frames are the centres of N equal segments (iMOVE's
evaluation sampling; :func:`experts.video.read_frames` with ``num_frames``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from stages.evaluation.imove_it import (
    GroundingQuery,
    charades_gt,
    parse_time_span,
    parse_two_boxes,
    score_captions,
    score_spatial,
    score_temporal,
)
from stages.training.config import TrainConfig
from stages.training.data import TrainSample, clip_end, load_samples
from stages.training.model import load_full_weights
from stages.training.parts import load_parts_weights

FINGERPRINT_FILE = "motionforge_fingerprint.json"
# Charades-STA queries carry no boxes; the question keeps the wording of iMOVE-IT's temporal grounding
# templates (stages/data/imove_it/task_templates.v1.json) so a model trained on them reads it the same way.
CHARADES_PROMPT = ("Times are given as <0> (start) to <300> (end) of the video. {sentence} "
                   "When does this happen? Give the start and end times.")


def checkpoint_config(ckpt: str | Path) -> TrainConfig:
    path = Path(ckpt) / FINGERPRINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{ckpt} has no {FINGERPRINT_FILE}: give a motionforge training run's final/ or "
                                "checkpoints/checkpoint-N/ folder")
    return TrainConfig.model_validate(json.loads(path.read_text(encoding="utf-8"))["config"])


def load_checkpoint(ckpt: str | Path, merge: bool = False, device: str = "auto") -> tuple[Any, Any, TrainConfig]:
    """(model, processor, training config) of a checkpoint. LoRA: the base model, its parts, then the adapter
    (merged into the weights with ``merge``); full fine-tuning: the base model and parts with the saved
    weights loaded over them."""
    from experts.base import resolve_device
    from experts.vlm import VlmSpec, load_transformers_weights
    from stages.training.model import apply_model_parts

    ckpt = Path(ckpt)
    cfg = checkpoint_config(ckpt)
    spec = VlmSpec(model_id=cfg.model.model_id, revision=cfg.model.revision, device=device, dtype=cfg.model.dtype)
    model, processor = load_transformers_weights(spec)
    model, processor = apply_model_parts(model, processor, cfg.model_parts)
    if (ckpt / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(ckpt))
        if merge:
            model = model.merge_and_unload()
    else:
        load_full_weights(model, ckpt)
    load_parts_weights(model, ckpt)  # the papers' parts' own weights, saved beside an adapter
    model.to(resolve_device(device))
    return model, processor, cfg


def export_merged(ckpt: str | Path, to: str | Path) -> Path:
    """A plain transformers checkpoint (LoRA merged) that any VLM loader reads, e.g. ``eval run --model DIR``.
    Only for runs without model parts: a part's modules are not part of the released architecture."""
    model, processor, cfg = load_checkpoint(ckpt, merge=True, device="cpu")
    if cfg.model_parts:
        raise ValueError("this run has model_parts, which a plain transformers checkpoint cannot hold; evaluate "
                         "it with --checkpoint instead")
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(to))
    processor.save_pretrained(str(to))
    return to


def first_question(sample: TrainSample) -> str:
    for role, text in sample.conversations:
        if role == "human":
            return text.replace("<video>", "", 1).lstrip("\n")
    raise ValueError(f"sample {sample.sample_id} has no question")


def centre_frames(path: str, start_s: float, end_s: float | None, n: int, short_side: int | None) -> list:
    from experts.video import read_frames

    frames = read_frames(path, start_s, end_s, num_frames=n, short_side=short_side)
    if not frames:
        raise ValueError(f"{path}: no frame decoded in [{start_s}, {end_s}]")
    return [f.image for f in frames]


def answer_all(vlm: Any, items: Sequence[tuple[str, str, Callable[[], list]]], max_new_tokens: int,
               batch_size: int, progress: Callable[[int, int], None] = lambda d, t: None
               ) -> tuple[dict[str, str | None], dict[str, str]]:
    """``items``: (id, question, frames loader). Returns (id -> answer or None, id -> error)."""
    from experts.vlm import VlmRequest

    answers: dict[str, str | None] = {}
    errors: dict[str, str] = {}
    for i in range(0, len(items), batch_size):
        reqs, ids = [], []
        for sid, question, load in items[i:i + batch_size]:
            try:
                frames = tuple(load())
            except Exception as exc:  # noqa: BLE001 -- one unreadable video is one miss, listed
                answers[sid], errors[sid] = None, f"{type(exc).__name__}: {exc}"
                continue
            reqs.append(VlmRequest(text=question, images=frames, as_video=len(frames) > 1,
                                   max_new_tokens=max_new_tokens, temperature=0.0))
            ids.append(sid)
        for sid, resp in zip(ids, vlm.generate(reqs) if reqs else []):
            answers[sid] = resp.text if resp.error is None else None
            if resp.error is not None:
                errors[sid] = resp.error
        progress(min(i + batch_size, len(items)), len(items))
    return answers, errors


def score_imove_it(samples: Sequence[TrainSample], answers: dict[str, str | None], use_java: bool | None = None) -> dict:
    """Metrics per task over held-out samples and their raw answers."""
    by_task: dict[str, list[TrainSample]] = {}
    for s in samples:
        by_task.setdefault(s.task or "", []).append(s)
    out: dict[str, Any] = {}
    if "temporal_grounding" in by_task:
        ss = by_task["temporal_grounding"]
        out["temporal_grounding"] = score_temporal(
            {s.sample_id: (s.t1_s, s.t2_s) for s in ss},
            {s.sample_id: parse_time_span(answers.get(s.sample_id), s.duration_s) for s in ss}).as_dict()
    if "spatial_grounding" in by_task:
        ss = by_task["spatial_grounding"]
        out["spatial_grounding"] = score_spatial(
            {s.sample_id: [s.box1_xyxy_px, s.box2_xyxy_px] for s in ss},
            {s.sample_id: parse_two_boxes(answers.get(s.sample_id), s.width, s.height) for s in ss}).as_dict()
    if "dynamic_captioning" in by_task:
        ss = by_task["dynamic_captioning"]
        out["dynamic_captioning"] = score_captions(
            {s.sample_id: [s.dynamic_caption or ""] for s in ss},
            {s.sample_id: answers.get(s.sample_id) for s in ss}, use_java=use_java).as_dict()
    return out


def evaluate_imove_it(vlm: Any, samples: Sequence[TrainSample], num_frames: int, short_side: int | None,
                      out_dir: str | Path, batch_size: int = 8, max_new_tokens: int = 64,
                      use_java: bool | None = None, progress=lambda d, t: None) -> dict:
    """Answer and score held-out iMOVE-IT samples; writes predictions.jsonl and metrics.json to ``out_dir``."""
    samples = [s for s in samples if s.task]
    if not samples:
        raise ValueError("no held-out iMOVE-IT samples to evaluate (is data.eval_fraction 0?)")
    items = [(s.sample_id, first_question(s),
              (lambda s=s: centre_frames(s.video_path, s.clip_start_s, clip_end(s), num_frames, short_side)))
             for s in samples]
    answers, errors = answer_all(vlm, items, max_new_tokens, batch_size, progress)
    metrics = score_imove_it(samples, answers, use_java)
    metrics["errors"] = errors
    _write(out_dir, [{"sample_id": s.sample_id, "task": s.task, "answer": answers.get(s.sample_id),
                      "reference": [t for r, t in s.conversations if r == "gpt"][0]} for s in samples], metrics)
    return metrics


def evaluate_charades(vlm: Any, queries: Sequence[GroundingQuery], videos: str | Path, num_frames: int,
                      short_side: int | None, out_dir: str | Path, batch_size: int = 8, max_new_tokens: int = 32,
                      extension: str = ".mp4", progress=lambda d, t: None) -> dict:
    """Temporal grounding on Charades-STA-style queries over the whole video ``<videos>/<vid><extension>``."""
    from experts.video import probe

    durations: dict[str, float] = {}
    errors: dict[str, str] = {}

    def duration(vid: str) -> float:
        if vid not in durations:
            durations[vid] = probe(os.path.join(str(videos), vid + extension), check_decode=False).duration_s
        return durations[vid]

    def loader(q: GroundingQuery):
        return lambda: centre_frames(os.path.join(str(videos), q.video_id + extension), 0.0, duration(q.video_id),
                                     num_frames, short_side)

    items = [(q.query_id, CHARADES_PROMPT.format(sentence=q.sentence), loader(q)) for q in queries]
    answers, errors = answer_all(vlm, items, max_new_tokens, batch_size, progress)
    pred = {q.query_id: parse_time_span(answers.get(q.query_id), durations[q.video_id])
            if q.video_id in durations else None for q in queries}
    metrics = {"temporal_grounding": score_temporal(charades_gt(queries), pred).as_dict(), "errors": errors}
    _write(out_dir, [{"query_id": q.query_id, "answer": answers.get(q.query_id), "pred_s": pred[q.query_id],
                      "gt_s": [q.start_s, q.end_s]} for q in queries], metrics)
    return metrics


def evaluate_motionbench(vlm: Any, meta: str | Path, videos: str | Path | None, num_frames: int,
                         short_side: int | None, out_dir: str | Path, answers: str | Path | None = None,
                         batch_size: int = 8, limit: int | None = None, progress=lambda d, t: None) -> dict:
    """MotionBench accuracy per category (the released meta format; :mod:`stages.evaluation.motionbench`),
    N uniform frames per clip."""
    from stages.evaluation.motionbench import build_inputs, meta_questions, read_answer_key, read_meta, \
        resolve_video, run_model, score

    questions = meta_questions(read_meta(meta))[:limit]
    inputs = build_inputs(questions, videos)

    def load_frames(inp):
        return centre_frames(resolve_video(inp.video_path, videos), inp.start_s or 0.0, inp.end_s, num_frames,
                             short_side)

    replies, errors = run_model(inputs, vlm, load_frames, as_video=True, batch_size=batch_size, progress=progress)
    result = score(questions, replies, read_answer_key(answers) if answers else None).as_dict()
    result["errors"] = errors
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "responses.json").write_text(json.dumps(replies, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def _write(out_dir: str | Path, predictions: list[dict], metrics: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for p in predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")


def held_out_samples(cfg: TrainConfig) -> list[TrainSample]:
    return load_samples(cfg.data, "eval")
