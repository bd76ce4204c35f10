"""A real, small train-and-evaluate step for compression ablations: fine-tune a VLM with one temporal fusion
setting on four-option motion questions and measure answer accuracy, MotionBench style (the answer is the
option letter the model scores highest at the answer position), and the speed of the training and the
evaluation loop (clips per second, peak GPU memory on CUDA).

Made for the tiny Qwen2-VL miniature on a CPU (tests, smoke runs); the same code runs a real checkpoint on a
GPU but does full fine-tuning with no LoRA and no data loader: the issue-17 trainer replaces it for real runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from experts.base import hf_load, resolve_device, resolve_dtype
from experts.model_parts import ModelPartsConfig, TemporalFusionConfig, apply_model_parts


@dataclass(frozen=True)
class ProbeResult:
    accuracy: float
    n_eval: int
    train_loss_first: float
    train_loss_last: float
    video_tokens_per_clip: int  # decoder tokens one clip's video costs after compression
    encoder_slots_per_clip: int  # temporal slots the vision encoder sees per clip
    train_seconds: float  # the optimiser loop alone (batches are encoded and on the device before it starts)
    # clips through forward, backward and the AdamW step per second of that loop, from the end of its first step
    # when it has two or more: the first step pays one-off costs (allocator growth, kernel selection, lazy init,
    # for the first cell of a process the library's own), which would otherwise tilt the grid against the
    # first cell run
    train_samples_per_s: float
    eval_samples_per_s: float  # clips scored per second of the evaluation loop (forward only)
    # most memory torch held on the GPU during training and evaluation, weights and optimiser state included;
    # None off CUDA (left out of the metrics rather than written as 0)
    peak_gpu_mib: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.__dict__.items() if v is not None}


def _letter_ids(tok: Any, letters: Sequence[str]) -> list[int]:
    ids = []
    for letter in letters:
        enc = tok(letter, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"option letter {letter!r} is {len(enc)} tokens in this tokenizer; need one")
        ids.append(enc[0])
    return ids


def train_and_evaluate(model_id: str, fusion: TemporalFusionConfig,
                       train: Sequence[tuple[np.ndarray, int]], evaluate: Sequence[tuple[np.ndarray, int]],
                       question: str, option_letters: Sequence[str], *, steps: int = 20, lr: float = 1e-3,
                       batch_size: int = 8, seed: int = 0, device: str = "auto", dtype: str = "auto",
                       video_fps: float = 2.0) -> ProbeResult:
    """Fine-tune ``model_id`` with ``fusion`` applied on ``train`` (frames, answer index) for ``steps``
    AdamW steps, then score ``evaluate``. Every clip must have the same frame count (a multiple of
    ``rate x temporal_patch_size``)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not train or not evaluate:
        raise ValueError("the probe needs at least one training and one evaluation clip")
    torch.manual_seed(seed)
    dev = resolve_device(device)
    model = hf_load(AutoModelForImageTextToText.from_pretrained, model_id, dtype=resolve_dtype(dtype, dev)).to(dev)
    proc = hf_load(AutoProcessor.from_pretrained, model_id)
    proc.tokenizer.padding_side = "left"  # the answer position is the last column of every row
    parts = apply_model_parts(model, proc, ModelPartsConfig(temporal_fusion=fusion))
    model.to(dev)
    letters = torch.tensor(_letter_ids(proc.tokenizer, option_letters), device=dev)
    video_token = model.config.video_token_id
    prompt = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True, tokenize=False)

    def encode(clips: Sequence[tuple[np.ndarray, int]]) -> tuple[dict, torch.Tensor]:
        frames = [np.ascontiguousarray(f) for f, _ in clips]
        meta = [{"fps": video_fps, "total_num_frames": len(f), "duration": len(f) / video_fps} for f in frames]
        enc = proc(text=[prompt] * len(frames), videos=frames, padding=True, return_tensors="pt",
                   video_metadata=meta, do_sample_frames=False)
        batch = parts.prepare_batch(dict(enc), video_token)
        float_dtype = next(model.parameters()).dtype
        batch = {k: (v.to(dev, float_dtype) if k == "pixel_values_videos" else v.to(dev)) for k, v in batch.items()}
        return batch, torch.tensor([a for _, a in clips], device=dev)

    def batches(clips):
        return [encode(clips[i:i + batch_size]) for i in range(0, len(clips), batch_size)]

    train_batches = batches(list(train))
    eval_batches = batches(list(evaluate))
    first_batch = train_batches[0][0]
    video_tokens = int((first_batch["input_ids"][0] == video_token).sum())
    slots = int(first_batch["video_grid_thw"][0, 0]) * fusion.rate

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    cuda = dev.type == "cuda"

    def sync() -> None:  # CUDA kernels run asynchronously: a wall clock read needs them finished
        if cuda:
            torch.cuda.synchronize(dev)

    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    losses = []
    trained = 0
    sync()
    t0 = time.perf_counter()
    steady_t0, steady_from = t0, 0
    for step in range(steps):
        batch, answers = train_batches[step % len(train_batches)]
        logits = model(**batch).logits[:, -1, :].index_select(-1, letters).float()
        loss = torch.nn.functional.cross_entropy(logits, answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        trained += len(answers)
        if step == 0 and steps > 1:
            sync()
            steady_t0, steady_from = time.perf_counter(), trained
    sync()
    t_end = time.perf_counter()
    train_s = t_end - t0
    model.eval()
    correct = n = 0
    sync()
    t0 = time.perf_counter()
    with torch.no_grad():
        for batch, answers in eval_batches:
            pred = model(**batch).logits[:, -1, :].index_select(-1, letters).argmax(-1)
            correct += int((pred == answers).sum())
            n += len(answers)
    sync()
    eval_s = time.perf_counter() - t0
    return ProbeResult(accuracy=correct / n, n_eval=n, train_loss_first=losses[0] if losses else float("nan"),
                       train_loss_last=losses[-1] if losses else float("nan"), video_tokens_per_clip=video_tokens,
                       encoder_slots_per_clip=slots, train_seconds=train_s,
                       # a loop faster than the clock's resolution still gives a finite rate
                       train_samples_per_s=(trained - steady_from) / max(t_end - steady_t0, 1e-9),
                       eval_samples_per_s=n / max(eval_s, 1e-9),
                       peak_gpu_mib=torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None)
