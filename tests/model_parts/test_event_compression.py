"""iMOVE 3.2.1 event-aware compression: the paper's token arithmetic, pooling values, planted boundaries."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experts.model_parts import EventAwareCompression, compress_events, event_token_count, segment_events
from experts.model_parts.event_compression import frame_change

# iMOVE Table 5 (96 frames, first frames 8x8 = 64 tokens): (K events, stride s) -> tokens. Written down from
# the paper, not computed by our code. Row 3 (K = 24, s = 2) is the paper's setting: 2,688 tokens, against
# InternVL2-4B's 4,096 (16 frames x 256). The paper states s and the token count; K = 24 follows from
# 64 K + 16 (96 - K) = 2688  =>  48 K = 1152  =>  K = 24, which is also Table 5's K column.
PAPER_TABLE5 = [(24, 2, 2688), (0, 2, 1536), (12, 2, 2112), (48, 2, 3840), (96, 2, 6144),
                (24, 1, 6144), (24, 4, 1824), (24, 8, 1608)]


@pytest.mark.parametrize("k,s,tokens", PAPER_TABLE5)
def test_token_counts_match_imove_table5(k, s, tokens):
    assert event_token_count(96, k, (8, 8), s) == tokens
    grids = torch.randn(96, 8, 8, 4)
    out = EventAwareCompression(num_events=k, stride=s)(grids)
    assert out.tokens.shape == (tokens, 4)
    assert len(out.event_starts) == k
    full = [i for i, c in enumerate(out.tokens_per_frame) if c == 64]
    assert full == (sorted(out.event_starts) if s > 1 else list(range(96)))
    assert all(c in (64, 64 // (s * s)) for c in out.tokens_per_frame)


def test_first_frames_full_and_the_rest_block_averaged():
    torch.manual_seed(0)
    grids = torch.randn(6, 8, 8, 3)
    out = compress_events(grids, [0, 4], stride=2)
    assert out.tokens_per_frame == (64, 16, 16, 16, 64, 16)
    assert out.frame_index.tolist() == sum(([i] * n for i, n in enumerate(out.tokens_per_frame)), [])
    rows = torch.split(out.tokens, list(out.tokens_per_frame))
    assert torch.equal(rows[0], grids[0].reshape(64, 3)) and torch.equal(rows[4], grids[4].reshape(64, 3))
    # replay: pooled token (i, j) of frame 2 is the mean of the 2x2 block at (2i, 2j), row-major
    g = grids[2].numpy()
    expect = np.array([[g[2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(0, 1)) for j in range(4)] for i in range(4)])
    # float32 sums of four values: equal to a few ulps whatever the summation order
    np.testing.assert_allclose(rows[2].numpy(), expect.reshape(16, 3), rtol=1e-6, atol=1e-6)


def test_planted_boundary_in_feature_sequence():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=32), rng.normal(size=32)
    feats = np.stack([(a if t < 37 else b) + 0.05 * rng.normal(size=32) for t in range(60)])
    assert segment_events(torch.tensor(feats), 2) == [0, 37]
    assert int(torch.argmax(frame_change(torch.tensor(feats)))) + 1 == 37


def _pixel_features(frames: np.ndarray, side: int = 8) -> torch.Tensor:
    """Frames averaged to side x side x RGB cells: a cheap per-frame feature for segmentation."""
    t, h, w, _ = frames.shape
    f = frames[:, : h - h % side, : w - w % side].astype(np.float32)
    f = f.reshape(t, side, f.shape[1] // side, side, f.shape[2] // side, 3).mean(axis=(2, 4))
    return torch.tensor(f.reshape(t, -1))


@pytest.mark.parametrize("seed", [3, 11])
def test_cut_planted_in_a_synthetic_video_is_found(seed):
    from stages.synth.videos import SynthConfig, render_frames

    cfg = SynthConfig(width=96, height=64, min_duration_s=3.0, max_duration_s=3.0, min_shots=2, max_shots=2,
                      object_size_px=(8, 12), too_large_probability=0.0, max_linear_objects=1)
    truth, frames = render_frames(seed, cfg)
    assert len(truth.cuts) == 1
    starts = segment_events(_pixel_features(frames), 2)
    assert starts == [0, truth.cuts[0]]


def test_tiny_vision_tower_features_find_the_cut():
    """The paper segments on the encoder's frame features; the tiny Qwen2-VL tower's pooled output does too."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from experts.base import resolve_tiny
    from stages.synth.videos import SynthConfig, render_frames

    cfg = SynthConfig(width=64, height=64, min_duration_s=2.0, max_duration_s=2.0, min_shots=2, max_shots=2,
                      object_size_px=(8, 12), too_large_probability=0.0, max_linear_objects=1,
                      min_shot_frames=20)
    truth, frames = render_frames(5, cfg)
    path = resolve_tiny("tiny://qwen2_vl")
    proc = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    enc = proc.image_processor(images=list(frames[:, :56, :56]), return_tensors="pt")
    with torch.no_grad():
        out = model.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output
    per_frame = out.reshape(len(frames), -1)
    assert segment_events(per_frame, 2) == [0, truth.cuts[0]]


def test_token_count_does_not_depend_on_content():
    still = torch.ones(20, 4, 4, 2)  # no change at all: boundaries fill up from the largest (zero) changes
    out = EventAwareCompression(num_events=5, stride=2)(still)
    assert out.tokens.shape[0] == event_token_count(20, 5, (4, 4), 2) == 5 * 16 + 15 * 4
    assert out.event_starts[0] == 0 and len(set(out.event_starts)) == 5


def test_a_grid_the_stride_does_not_divide_pools_its_edge_blocks_over_the_cells_there_are():
    grids = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 3, 3, 1)  # 2 frames of 3 x 3 cells, 1 channel
    out = compress_events(grids, [0], 2)
    assert event_token_count(2, 1, (3, 3), 2) == 9 + 4 == out.tokens.shape[0]
    f = grids[1, :, :, 0]
    # blocks {0,1}x{0,1}, {0,1}x{2}, {2}x{0,1}, {2}x{2}: means of the cells each block holds
    expect = [f[:2, :2].mean(), f[:2, 2].mean(), f[2, :2].mean(), f[2, 2]]
    assert out.tokens[9:, 0].tolist() == [float(v) for v in expect]
    assert out.grid_position[9:].tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]
    assert event_token_count(10, 2, (7, 7), 2) == 2 * 49 + 8 * 16


def test_bad_inputs_are_clear():
    with pytest.raises(ValueError, match="no frames"):
        segment_events(torch.zeros(0, 3), 2)
    with pytest.raises(ValueError, match="segmentation features"):
        EventAwareCompression(2, 2)(torch.zeros(4, 4, 4, 2), torch.zeros(3, 5))
