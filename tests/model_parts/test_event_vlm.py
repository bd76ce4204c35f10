"""iMOVE 3.2.1 event-aware compression inside the tiny Qwen2-VL: 96 slots of 8x8 merged tokens -> 2,688
decoder tokens, positions, and gradients into the vision tower."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experts.model_parts import EventCompressionConfig, ModelPartsConfig, apply_model_parts


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoProcessor, Qwen2VLVideoProcessor

    from experts.base import resolve_tiny

    path = resolve_tiny("tiny://qwen2_vl")
    proc = AutoProcessor.from_pretrained(path)
    # 224 x 224 frames: 16 x 16 patches of 14 px, merged 2 x 2 -> 8 x 8 = 64 tokens per slot (iMOVE's 8 x 8)
    proc.video_processor = Qwen2VLVideoProcessor(min_pixels=224 * 224, max_pixels=224 * 224, cap_pixels_per_frame=True)
    return path, proc


def _batch(proc, n_slots: int, texts: list[str]):
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (2 * n_slots, 224, 224, 3), dtype=np.uint8) for _ in texts]
    prompts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": t}]},
                                         {"role": "assistant", "content": [{"type": "text", "text": "A"}]}],
                                        tokenize=False) for t in texts]
    proc.tokenizer.padding_side = "left"
    meta = [{"fps": 2.0, "total_num_frames": 2 * n_slots, "duration": float(n_slots)}] * len(texts)
    return dict(proc(text=prompts, videos=videos, padding=True, return_tensors="pt", video_metadata=meta,
                     do_sample_frames=False))


def test_96_slots_cost_2688_tokens_in_the_vlm_and_train(tiny):
    from transformers import AutoModelForImageTextToText

    path, proc = tiny
    model = AutoModelForImageTextToText.from_pretrained(path)
    parts = apply_model_parts(model, proc, ModelPartsConfig(event_compression=EventCompressionConfig(enabled=True)))
    vid = model.config.video_token_id
    batch = _batch(proc, 96, ["Which event comes first?"])
    assert batch["video_grid_thw"].tolist() == [[96, 16, 16]]
    assert (batch["input_ids"] == vid).sum(1).tolist() == [96 * 64]  # 6,144 before compression
    batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] == vid, -100)
    out = parts.event_inputs(model, batch, vid)
    assert (out["inputs_embeds"].shape[1], out["position_ids"].shape) == (out["attention_mask"].shape[1],
                                                                          (3, 1, out["attention_mask"].shape[1]))
    text_len = int(((batch["input_ids"][0] != vid) & batch["attention_mask"][0].bool()).sum())
    assert int(out["attention_mask"][0].sum()) == text_len + 2688  # 24 x 64 + 72 x 16
    assert int((out["labels"][0] != -100).sum()) == text_len
    # positions: the first video token sits right after the text before it; rows/cols of a full slot span
    # 0..7, pooled ones 0, 2, 4, 6; text after the video continues past the largest position
    row0 = out["position_ids"][:, 0, out["attention_mask"][0].bool()]
    ids0 = batch["input_ids"][0][batch["attention_mask"][0].bool()]
    first_video = int(torch.nonzero(ids0 == vid)[0])
    video_pos = row0[:, first_video:first_video + 2688] - first_video
    assert video_pos[0].max() == 95 and set(video_pos[1].tolist()) == set(range(8))
    assert int(row0[0, first_video + 2688]) == first_video + 96
    model.train()
    loss = model(**out).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.model.visual.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_event_and_fusion_together_are_refused():
    from pydantic import ValidationError

    from experts.model_parts import TemporalFusionConfig

    with pytest.raises(ValidationError, match="enable one of them"):
        ModelPartsConfig(event_compression=EventCompressionConfig(enabled=True),
                         temporal_fusion=TemporalFusionConfig(method="te_fusion", rate=2))
