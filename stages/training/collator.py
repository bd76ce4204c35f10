"""Batch collation: conversations + frames -> the model's inputs, with loss only on the assistant's words.

The checkpoint's own chat template renders the conversation and its processor expands the video placeholder
into the model's vision tokens (Qwen: 3D patches; InternVL: per-frame image tokens), exactly as at inference
(:mod:`experts.vlm`). Which tokens are the assistant's is found without knowing the template's markers: the
conversation is rendered again up to each assistant turn (with the generation prompt) and through it; the
token counts from each cut to the end of the text are the same after the processor's expansion, because the
video sits before every assistant turn. Sequences are right-padded, so a row's end is its last real token.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from stages.training.data import TrainSample

IGNORE_INDEX = -100
VIDEO_PLACEHOLDER = "<video>"
_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def build_messages(sample: TrainSample, has_video: bool) -> list[dict]:
    """Chat messages in the processors' content-list form; the first ``<video>`` becomes the video slot."""
    messages: list[dict] = []
    placed = False
    for role, text in sample.conversations:
        content: list[dict] = []
        if role == "human" and has_video and not placed and (VIDEO_PLACEHOLDER in text or not any(
                VIDEO_PLACEHOLDER in t for _, t in sample.conversations)):
            content.append({"type": "video"})
            text = text.replace(VIDEO_PLACEHOLDER, "", 1).lstrip("\n")
            placed = True
        elif VIDEO_PLACEHOLDER in text and not has_video:
            raise ValueError(f"sample {sample.sample_id}: the conversation has a <video> placeholder but no video")
        content.append({"type": "text", "text": text})
        messages.append({"role": _ROLES[role], "content": content})
    return messages


def assistant_spans_from_end(tokenizer: Any, render, messages: list[dict]) -> list[tuple[int, int]]:
    """(tokens from the turn's first token to the end, tokens from the turn's end to the end) per assistant
    turn. ``render(messages, add_generation_prompt)`` gives the template's text."""
    def n_tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    full = render(messages, False)
    full_ids = n_tokens(full)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(messages[:i], True)
        upto = render(messages[:i + 1], False)
        head_ids, upto_ids = n_tokens(head), n_tokens(upto)
        if not (full.startswith(head) and full.startswith(upto) and full_ids[:len(upto_ids)] == upto_ids
                and upto_ids[:len(head_ids)] == head_ids):
            raise ValueError("the chat template does not render a conversation as the concatenation of its turns; "
                             "cannot locate the assistant's tokens")
        spans.append((len(full_ids) - len(head_ids), len(full_ids) - len(upto_ids)))
    return spans


class VlmCollator:
    """Callable for the Trainer's dataloader: list of dataset items -> model kwargs with ``labels``."""

    def __init__(self, processor: Any, num_frames: int, parts: Any = None, video_token_id: int | None = None) -> None:
        """``parts``: the model's :class:`experts.model_parts.AppliedModelParts` (None: no papers' parts):
        conversations are written in its text form and batches rewritten by its ``prepare_batch`` with
        ``video_token_id``."""
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.num_frames = num_frames
        if parts is not None and video_token_id is None:
            raise ValueError("a collator with model parts needs the model's video_token_id")
        self.parts = parts
        self.video_token_id = video_token_id

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def __call__(self, items: Sequence[dict]) -> dict:
        import torch

        texts, videos, metadata, spans = [], [], [], []
        for it in items:
            s: TrainSample = it["sample"]
            frames = it["frames"]
            if self.parts is not None:
                s = dataclasses.replace(s, conversations=tuple((role, self.parts.to_model_text(text))
                                                               for role, text in s.conversations))
            messages = build_messages(s, frames is not None)
            texts.append(self._render(messages, False))
            spans.append(assistant_spans_from_end(self.tokenizer, self._render, messages))
            if frames is not None:
                # the parts may change what the processor sees (event compression: one tower slot per frame)
                video = np.asarray(frames) if self.parts is None else self.parts.prepare_video(frames)
                videos.append(video)
                dur = max(float(it.get("duration_s") or 0.0), 1e-3)
                metadata.append({"fps": len(video) / dur, "total_num_frames": len(video), "duration": dur})
        kwargs: dict[str, Any] = {}
        if videos:
            kwargs["video_metadata"] = metadata
        # explicit: some processors (InternVL) default to left padding in their own text kwargs
        enc = self.processor(text=texts, videos=videos or None, padding=True, padding_side="right", return_tensors="pt",
                             **kwargs)
        ids = enc["input_ids"]
        labels = torch.full_like(ids, IGNORE_INDEX)
        lengths = enc["attention_mask"].sum(dim=1).tolist()
        for r, (length, row_spans) in enumerate(zip(lengths, spans)):
            for from_end_start, from_end_stop in row_spans:
                a, b = length - from_end_start, length - from_end_stop
                labels[r, a:b] = ids[r, a:b]
        enc["labels"] = labels
        if self.parts is not None:
            # after the labels: the rewrite shrinks every sequence tensor (labels included) the same way
            return self.parts.prepare_batch(dict(enc), self.video_token_id)
        return dict(enc)
