"""MotionBench section 4 TE Fusion and its baselines around the tiny Qwen2-VL vision tower."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experts.model_parts import (ModelPartsConfig, TemporalFusionConfig, TemporalFusionTower, apply_model_parts,
                                 compress_video_placeholders)

METHODS = ["none", "pre_encoder", "qformer", "post_pool", "kangaroo", "post_mlp", "te_fusion"]


@pytest.fixture(scope="module")
def tiny_path():
    from experts.base import resolve_tiny

    return resolve_tiny("tiny://qwen2_vl")


def _load(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)


def _video_pixels(proc, n_frames: int, seed: int = 0):
    """Qwen2-VL video patches for n_frames random 56x56 frames: (n_frames / 2) slots of 4x4 patches."""
    frames = np.random.default_rng(seed).integers(0, 255, (n_frames, 56, 56, 3), dtype=np.uint8)
    enc = proc.video_processor(videos=[frames], return_tensors="pt", do_sample_frames=False)
    return enc["pixel_values_videos"], enc["video_grid_thw"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [2, 4, 6, 8])
def test_k_slots_give_one_slots_tokens(tiny_path, method, k):
    model, proc = _load(tiny_path)
    plain_tower = model.model.visual
    apply_model_parts(model, proc, ModelPartsConfig(temporal_fusion=TemporalFusionConfig(method=method, rate=k)))
    tower = model.model.visual
    assert isinstance(tower, TemporalFusionTower) and tower.tower is plain_tower
    pixels, grid = _video_pixels(proc, 2 * k)  # k slots of temporal_patch_size = 2 frames
    assert grid.tolist() == [[k, 4, 4]]
    one_slot = int(grid[0, 1] * grid[0, 2]) // 4  # tokens the plain tower gives one slot: 4
    with torch.no_grad():
        single = plain_tower(pixels[: 16], grid_thw=torch.tensor([[1, 4, 4]])).pooler_output
        out = tower(pixels, grid_thw=torch.tensor([[1, 4, 4]])).pooler_output
    assert single.shape[0] == one_slot
    assert out.shape == single.shape


def test_post_pool_and_untrained_post_mlp_equal_the_mean_of_per_slot_outputs(tiny_path):
    model, proc = _load(tiny_path)
    pixels, grid = _video_pixels(proc, 16)  # 8 slots
    with torch.no_grad():
        per_slot = model.model.visual(pixels, grid_thw=grid).pooler_output  # (8 * 4, D), slot-major
    expect = per_slot.reshape(2, 4, 4, -1).mean(1).reshape(8, -1)  # rate 4: slots 0-3 and 4-7 averaged
    for method in ("post_pool", "post_mlp"):
        m, p = _load(tiny_path)
        apply_model_parts(m, p, ModelPartsConfig(temporal_fusion=TemporalFusionConfig(method=method, rate=4)))
        with torch.no_grad():
            got = m.model.visual(pixels, grid_thw=torch.tensor([[2, 4, 4]])).pooler_output
        # same float32 operations in a different order (a matmul by I/k vs a mean): a few ulps
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_none_keeps_every_kth_slot(tiny_path):
    model, proc = _load(tiny_path)
    pixels, grid = _video_pixels(proc, 16)
    with torch.no_grad():
        first_slots = torch.cat([pixels[16 * s: 16 * (s + 1)] for s in (0, 4)])
        expect = model.model.visual(first_slots, grid_thw=torch.tensor([[2, 4, 4]])).pooler_output
    apply_model_parts(model, proc, ModelPartsConfig(temporal_fusion=TemporalFusionConfig(method="none", rate=4)))
    with torch.no_grad():
        got = model.model.visual(pixels, grid_thw=torch.tensor([[2, 4, 4]])).pooler_output
    torch.testing.assert_close(got, expect)


def test_pre_encoder_kernel_is_the_inflated_checkpoint_kernel(tiny_path):
    model, proc = _load(tiny_path)
    pixels, _ = _video_pixels(proc, 8)  # 4 slots, rate 4 -> one fused slot
    embed = model.model.visual.patch_embed
    with torch.no_grad():
        per_slot = embed(pixels).reshape(4, 16, -1)  # the checkpoint's embedding of each slot
    apply_model_parts(model, proc, ModelPartsConfig(temporal_fusion=TemporalFusionConfig(method="pre_encoder", rate=4)))
    with torch.no_grad():
        fused = model.model.visual._fused_embed(pixels, 1)
    # a k-times-longer kernel holding the original kernel k times, divided by k: the mean of the slots
    torch.testing.assert_close(fused, per_slot.mean(0), rtol=1e-5, atol=1e-5)


def test_te_fusion_attends_across_the_group_and_not_beyond(tiny_path):
    """With the projection set to read slot 0 of each group only, changing slot 1 moves group 0's fused states
    with TE Fusion (slot 0 attended to slot 1 in the encoder) but not with Kangaroo (every slot encoded alone);
    changing slot 2 (next group at k = 2) moves neither."""
    pixels, _ = _video_pixels(_load(tiny_path)[1], 8)  # 4 slots = 2 groups at k = 2
    changed_same, changed_next = pixels.clone(), pixels.clone()
    changed_same[16:32] += 1.0
    changed_next[32:48] += 1.0
    states = {}
    for method in ("te_fusion", "kangaroo"):
        m, p = _load(tiny_path)
        apply_model_parts(m, p, ModelPartsConfig(temporal_fusion=TemporalFusionConfig(method=method, rate=2)))
        proj = m.model.visual.temporal_proj
        c = proj.out_features
        with torch.no_grad():
            proj.weight.copy_(torch.cat([torch.eye(c), torch.zeros(c, c)], dim=1))  # slot 0 of the pair only
            states[method] = [m.model.visual(x, grid_thw=torch.tensor([[2, 4, 4]])).last_hidden_state[:16]
                              for x in (pixels, changed_same, changed_next)]
    te, kangaroo = states["te_fusion"], states["kangaroo"]
    assert (te[1] - te[0]).abs().max() > 1e-3
    torch.testing.assert_close(kangaroo[1], kangaroo[0])
    torch.testing.assert_close(te[2], te[0])
    torch.testing.assert_close(kangaroo[2], kangaroo[0])


def test_untrained_te_fusion_is_the_merger_of_the_mean_jointly_encoded_state(tiny_path):
    """MotionBench appendix 8 item 1 and its pseudo-code (``concat_neighbor_hidden`` then
    ``downsample_with_proj``): after the joint encoding, the k slots' per-patch states are concatenated on the
    hidden axis and projected, and only then spatially downsampled by the merger. Untrained (slot embedding 0,
    projection = mean of the k slots) that is the plain tower run over all 8 slots with its attention segments
    written here by hand as two 4-slot groups (4 x 16 patches = 64 rows each), the mean of each group's 4 slots'
    per-patch states, then the plain merger. It is neither the mean after the merger (the order this method
    had before) nor Kangaroo (slots encoded alone)."""
    model, proc = _load(tiny_path)
    pixels, grid = _video_pixels(proc, 16)  # 8 slots of 4x4 patches
    plain = model.model.visual
    with torch.no_grad():
        joint = plain(pixels, grid_thw=grid, cu_seqlens=torch.tensor([0, 64, 128], dtype=torch.int32))
        states = joint.last_hidden_state.reshape(2, 4, 16, -1).mean(1).reshape(32, -1)  # rate 4: slots 0-3, 4-7
        expect = plain.merger(states)
        merged_then_mean = joint.pooler_output.reshape(2, 4, 4, -1).mean(1).reshape(8, -1)
        alone = plain(pixels, grid_thw=grid).last_hidden_state.reshape(2, 4, 16, -1).mean(1).reshape(32, -1)
        kangaroo_start = plain.merger(alone)
    apply_model_parts(model, proc, ModelPartsConfig(temporal_fusion=TemporalFusionConfig(method="te_fusion", rate=4)))
    tower = model.model.visual
    assert not tower.slot_embed.any()
    seen = []
    tower.temporal_proj.register_forward_hook(lambda _m, args, _out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        got = tower(pixels, grid_thw=torch.tensor([[2, 4, 4]]))
    # the projection reads per-patch states (2 fused slots x 16 patches, 4 slots' widths side by side), not the
    # 2 x 4 merged tokens: in the tiny tower both widths are 32, so the row count is what tells them apart
    assert seen == [(32, 4 * states.shape[-1])]
    # a matmul by I/k against a mean: float32 reordering, a few ulps before the merger's LayerNorm
    torch.testing.assert_close(got.pooler_output, expect, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.last_hidden_state, states, rtol=1e-4, atol=1e-5)
    # the other orders and segments give visibly different tokens (seen: differences of order 0.1 to 1)
    assert (got.pooler_output - merged_then_mean).abs().max() > 1e-3
    assert (got.pooler_output - kangaroo_start).abs().max() > 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_full_vlm_forward_and_gradients_reach_every_trainable_part(tiny_path, method):
    model, proc = _load(tiny_path)
    parts = apply_model_parts(model, proc, ModelPartsConfig(temporal_fusion=TemporalFusionConfig(method=method, rate=2)))
    frames = np.random.default_rng(1).integers(0, 255, (8, 56, 56, 3), dtype=np.uint8)
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}],
                                      add_generation_prompt=True, tokenize=False)
             for q in ("Which way does the ball move?", "Count.")]
    proc.tokenizer.padding_side = "left"
    enc = proc(text=texts, videos=[frames, frames[::-1].copy()], padding=True, return_tensors="pt",
               video_metadata=[{"fps": 2.0, "total_num_frames": 8, "duration": 4.0}] * 2, do_sample_frames=False)
    vid = model.config.video_token_id
    assert (enc["input_ids"] == vid).sum(1).tolist() == [16, 16]
    batch = parts.prepare_batch(dict(enc), vid)
    assert (batch["input_ids"] == vid).sum(1).tolist() == [8, 8]
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4], [2, 4, 4]]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in parts.new_parameters.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    tower = model.model.visual.tower
    encoder_params = [("tower." + n, p) for n, p in tower.named_parameters()
                      if not (method == "pre_encoder" and n.startswith("patch_embed."))]
    for name, p in encoder_params + list(model.model.language_model.named_parameters())[:3]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    expected_new = {"none": set(), "post_pool": set(), "pre_encoder": {"fused_patch_embed.weight"},
                    "post_mlp": {"temporal_proj.weight", "temporal_proj.bias"},
                    "kangaroo": {"temporal_proj.weight", "temporal_proj.bias"},
                    "te_fusion": {"temporal_proj.weight", "temporal_proj.bias", "slot_embed"}}.get(method)
    if method == "qformer":
        expected = {"qformer.query", "qformer.key_pos", "qformer.slot_pos", "qformer.norm.weight"}
        assert expected <= set(parts.new_parameters)
        assert all(n.startswith("qformer.") for n in parts.new_parameters)
    else:
        assert set(parts.new_parameters) == expected_new
    # Linear(k * C -> C) over the encoder's per-patch states (the tiny tower has C = D = 32, so these shapes
    # document the layout; test_untrained_te_fusion_... pins where the projection sits)
    if method in ("kangaroo", "te_fusion"):
        c = tower.merger.ln_q.normalized_shape[0]
        assert tuple(parts.new_parameters["temporal_proj.weight"].shape) == (c, 2 * c)
    if method == "post_mlp":  # Linear(k * D -> D) over the merged tokens
        d = tower.merger.mlp[-1].out_features
        assert tuple(parts.new_parameters["temporal_proj.weight"].shape) == (d, 2 * d)
    # generation reads the compressed grid for its M-RoPE positions, so it runs on the rewritten batch as is
    model.eval()
    with torch.no_grad():
        gen = model.generate(**{k: v for k, v in batch.items()}, max_new_tokens=2, do_sample=False,
                             pad_token_id=proc.tokenizer.pad_token_id)
    assert gen.shape[0] == 2 and gen.shape[1] > batch["input_ids"].shape[1]


def test_placeholder_rewrite_errors_and_padding():
    ids = torch.tensor([[0, 0, 5, 9, 9, 9, 9, 6, 7], [5, 9, 9, 9, 9, 9, 9, 6, 7]])
    mask = (ids != 0).long()
    grid = torch.tensor([[2, 2, 2], [3, 2, 2]])  # 4 and 6 placeholders after a 2x2 merge... rate 2 -> 2, 3
    with pytest.raises(ValueError, match="divisible"):
        compress_video_placeholders({"input_ids": ids, "attention_mask": mask, "video_grid_thw": grid}, 2, 9, 0)
    grid = torch.tensor([[2, 2, 2], [4, 2, 2]])
    ids = torch.tensor([[0, 0, 0, 0, 5, 9, 9, 9, 9, 6], [5, 9, 9, 9, 9, 9, 9, 9, 9, 6]])
    mask = (ids != 0).long()
    out = compress_video_placeholders({"input_ids": ids, "attention_mask": mask, "video_grid_thw": grid}, 2, 9, 0)
    assert out["input_ids"].tolist() == [[0, 0, 5, 9, 9, 6], [5, 9, 9, 9, 9, 6]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert out["video_grid_thw"].tolist() == [[1, 2, 2], [2, 2, 2]]


def test_other_towers_and_bad_rates_are_refused(tmp_path):
    from pydantic import ValidationError
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from experts.base import resolve_tiny

    with pytest.raises(ValidationError):
        TemporalFusionConfig(method="te_fusion", rate=1)
    path = resolve_tiny("tiny://qwen2_5_vl")
    model, proc = AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)
    for method in ("te_fusion", "pre_encoder", "kangaroo"):
        with pytest.raises(TypeError, match="runs inside the encoder.*Qwen2.5-VL's tower reorders patches"):
            apply_model_parts(model, proc, ModelPartsConfig(temporal_fusion=TemporalFusionConfig(method=method, rate=2)))


@pytest.mark.parametrize("method", ["none", "qformer", "post_pool", "post_mlp"])
def test_post_encoder_methods_run_on_qwen2_5_vl(method):
    """The methods that only fuse the tower's merged output work on Qwen2.5-VL's windowed tower: k slots ->
    one slot's tokens, a training step reaches the new parameters, and generate() runs on the rewritten batch
    (whose second_per_grid_ts now spans the k fused slots)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from experts.base import resolve_tiny

    path = resolve_tiny("tiny://qwen2_5_vl")
    model, proc = AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)
    parts = apply_model_parts(model, proc, ModelPartsConfig(temporal_fusion=TemporalFusionConfig(method=method, rate=2)))
    frames = np.random.default_rng(2).integers(0, 255, (8, 56, 56, 3), dtype=np.uint8)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Move?"}]}],
                                    add_generation_prompt=True, tokenize=False)
    enc = dict(proc(text=[text], videos=[frames], return_tensors="pt", do_sample_frames=False,
                    video_metadata=[{"fps": 2.0, "total_num_frames": 8, "duration": 4.0}]))
    vid = model.config.video_token_id
    full_tokens = int((enc["input_ids"] == vid).sum())
    batch = parts.prepare_batch(enc, vid)
    assert int((batch["input_ids"] == vid).sum()) * 2 == full_tokens
    assert batch["second_per_grid_ts"].tolist() == [2 * t for t in enc["second_per_grid_ts"].tolist()]
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in parts.new_parameters.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=2, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
    assert gen.shape[1] == batch["input_ids"].shape[1] + 2


def test_untrained_kangaroo_is_the_merger_of_the_mean_encoder_state(tiny_path):
    """Kangaroo (appendix 8 item 3, pseudo-code's temporal MLP before the spatial downsample): the k slots'
    per-patch encoder states are fused before the merger. At its documented start (the mean of the k slots) it
    equals the plain tower's merger applied to the mean of its per-slot encoder states, computed here from the
    plain tower alone; and that is not PLLaVA's mean after the merger (the merger is not linear)."""
    model, proc = _load(tiny_path)
    pixels, grid = _video_pixels(proc, 16)  # 8 slots of 4x4 patches
    plain = model.model.visual
    with torch.no_grad():
        out = plain(pixels, grid_thw=grid)
        states = out.last_hidden_state.reshape(2, 4, 16, -1).mean(1).reshape(32, -1)  # rate 4: slots 0-3, 4-7
        expect = plain.merger(states)
        pooled_after = out.pooler_output.reshape(2, 4, 4, -1).mean(1).reshape(8, -1)
    apply_model_parts(model, proc, ModelPartsConfig(temporal_fusion=TemporalFusionConfig(method="kangaroo", rate=4)))
    with torch.no_grad():
        got = model.model.visual(pixels, grid_thw=torch.tensor([[2, 4, 4]]))
    # a matmul by I/k against a mean: float32 reordering, a few ulps before the merger's LayerNorm
    torch.testing.assert_close(got.pooler_output, expect, rtol=1e-4, atol=1e-5)
    assert got.last_hidden_state.shape == (32, states.shape[-1])
    assert (got.pooler_output - pooled_after).abs().max() > 1e-3


def test_qformer_reads_its_own_group_only(tiny_path):
    """Each group of k slots is one Q-Former sequence: changing slot 1 (group 0 at k = 2) moves group 0's
    tokens and leaves group 1's exactly as they were."""
    model, proc = _load(tiny_path)
    apply_model_parts(model, proc, ModelPartsConfig(temporal_fusion=TemporalFusionConfig(method="qformer", rate=2)))
    pixels, _ = _video_pixels(proc, 8)  # 4 slots = 2 groups
    changed = pixels.clone()
    changed[16:32] += 1.0
    with torch.no_grad():
        a = model.model.visual(pixels, grid_thw=torch.tensor([[2, 4, 4]])).pooler_output
        b = model.model.visual(changed, grid_thw=torch.tensor([[2, 4, 4]])).pooler_output
    assert a.shape[0] == 8  # 2 groups x one slot's 2 x 2 merged tokens
    assert (a[:4] - b[:4]).abs().max() > 1e-4
    torch.testing.assert_close(a[4:], b[4:])
