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


def _small_batch(proc, parts, n_frames=(6, 4), size=64, seed=0):
    """Two videos of different lengths (the fixture's processor makes 8 x 8 merged tokens per slot), one frame per
    slot, left padded."""
    rng = np.random.default_rng(seed)
    videos = [parts.prepare_video(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)) for n in n_frames]
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}],
                                      add_generation_prompt=True, tokenize=False)
             for q in ("Which way does it move?", "Count the jumps in this clip, please.")]
    proc.tokenizer.padding_side = "left"
    meta = [{"fps": 2.0, "total_num_frames": len(v), "duration": len(v) / 2.0} for v in videos]
    return dict(proc(text=texts, videos=videos, padding=True, return_tensors="pt", video_metadata=meta,
                     do_sample_frames=False))


def _event_model(path, proc, num_events=2):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path)
    cfg = ModelPartsConfig(event_compression=EventCompressionConfig(enabled=True, num_events=num_events))
    return model, apply_model_parts(model, proc, cfg)


def test_96_frames_give_2688_placeholders_through_the_batch_path(tiny):
    """iMOVE's 96 frames at 224 px: one tower slot per frame (prepare_video), 8 x 8 merged tokens per slot, and
    prepare_batch leaves 24 x 64 + 72 x 16 = 2,688 placeholders (computed here from the paper's numbers)."""
    path, proc = tiny
    model, parts = _event_model(path, proc, num_events=24)
    frames = np.zeros((96, 224, 224, 3), dtype=np.uint8)
    video = parts.prepare_video(frames)
    assert video.shape[0] == 192  # each frame fills one slot of temporal_patch_size = 2
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}],
                                      add_generation_prompt=True, tokenize=False)
    enc = dict(proc(text=[prompt], videos=[video], return_tensors="pt", do_sample_frames=False,
                    video_metadata=[{"fps": 2.0, "total_num_frames": 192, "duration": 96.0}]))
    assert enc["video_grid_thw"].tolist() == [[96, 16, 16]]
    batch = parts.prepare_batch(enc, model.config.video_token_id)
    assert int((batch["input_ids"] == model.config.video_token_id).sum()) == 24 * 64 + (96 - 24) * 16 == 2688
    assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
    assert int((batch["mm_token_type_ids"] == 2).sum()) == 2688


def test_the_models_own_forward_equals_the_explicit_event_inputs(tiny):
    """The compressed forward (placeholders shrunk, pixels in, inputs_embeds and positions built inside the
    model) gives the logits of the explicit path (event_inputs: embeddings and positions built outside)."""
    path, proc = tiny
    model, parts = _event_model(path, proc)
    vid = model.config.video_token_id
    batch = _small_batch(proc, parts)
    assert batch["video_grid_thw"][:, 0].tolist() == [6, 4]
    inside = parts.prepare_batch(batch, vid)
    # 6 slots, 2 events: 2 x 64 + 4 x 16; 4 slots: 2 x 64 + 2 x 16
    assert (inside["input_ids"] == vid).sum(1).tolist() == [192, 160]
    model.eval()
    with torch.no_grad():
        a = model(**inside).logits
        b = model(**parts.event_inputs(model, batch, vid)).logits
    mask = inside["attention_mask"].bool()
    # the same float32 operations in the same order on both paths; 1e-5 covers a different kernel split
    torch.testing.assert_close(a[mask], b[mask], rtol=1e-5, atol=1e-5)


def test_generate_continues_from_the_compressed_positions(tiny):
    """Greedy generate() with a KV cache scores each new token as a full forward over the grown sequence does
    (positions recomputed from scratch each time): the positions generate asks for before its prefill, the
    video tokens it keeps for the prefill and the decode steps' positions agree with the training forward's."""
    path, proc = tiny
    model, parts = _event_model(path, proc)
    batch = parts.prepare_batch(_small_batch(proc, parts, seed=1), model.config.video_token_id)
    model.eval()
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id,
                             output_logits=True, return_dict_in_generate=True)
        new = gen.sequences[:, batch["input_ids"].shape[1]:]
        assert new.shape == (2, 3)
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
        for step in range(3):
            logits = model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types,
                           pixel_values_videos=batch["pixel_values_videos"],
                           video_grid_thw=batch["video_grid_thw"]).logits[:, -1]
            # cached attention against a full recompute: float32 reordering only (a wrong position moves
            # logits by far more than 1e-4)
            torch.testing.assert_close(gen.logits[step], logits, rtol=1e-4, atol=1e-4)
            ids = torch.cat([ids, new[:, step:step + 1]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            types = torch.cat([types, torch.zeros_like(types[:, :1])], 1)


def test_a_batch_not_rewritten_is_refused_clearly(tiny):
    path, proc = tiny
    model, parts = _event_model(path, proc)
    batch = _small_batch(proc, parts)  # placeholders still uncompressed
    with pytest.raises(ValueError, match="prepare_batch|do not match"):
        model(**batch)


def test_qwen2_5_vl_is_refused_for_event_compression():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from experts.base import resolve_tiny

    path = resolve_tiny("tiny://qwen2_5_vl")
    model, proc = AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)
    with pytest.raises(TypeError, match="Qwen2.5-VL times its M-RoPE"):
        apply_model_parts(model, proc, ModelPartsConfig(event_compression=EventCompressionConfig(enabled=True)))


def test_a_cut_planted_in_a_video_is_an_event_start_inside_the_model(tiny):
    """Six frames, a hard cut before frame 4 (two still scenes of random pixels): with K = 2 the model's own
    forward keeps frames 0 and 4 at full resolution, whatever the tower's weights (identical slots give
    identical features, so the only change is at the cut)."""
    path, proc = tiny
    model, parts = _event_model(path, proc, num_events=2)
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, 255, (1, 64, 64, 3), dtype=np.uint8) for _ in range(2))
    video = parts.prepare_video(np.concatenate([a.repeat(4, 0), b.repeat(2, 0)]))
    enc = proc.video_processor(videos=[video], return_tensors="pt", do_sample_frames=False)
    with torch.no_grad():
        model.model.get_video_features(enc["pixel_values_videos"], enc["video_grid_thw"])
    _, [(frame_index, _)] = model.model._motionforge_event_layout
    per_frame = torch.bincount(frame_index, minlength=6).tolist()
    assert per_frame == [64, 16, 16, 16, 64, 16]
