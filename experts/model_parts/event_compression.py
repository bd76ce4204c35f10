"""iMOVE 3.2.1, event-aware spatiotemporal efficient modeling (pure torch, no parameters).

1. Adaptive event segmentation. The paper's equations (1)-(2) (lost in the text we have) take the cosine
   similarity of adjacent frame features and its rate of change, and pick the K largest extreme points as
   event boundaries. Here: ``change[t] = 1 - cos(f[t-1], f[t])`` for t >= 1; its local maxima are the
   candidate boundaries, the K - 1 largest become event starts, and frame 0 always starts the first event
   (nothing precedes it). So K events give exactly K full-resolution frames, which is the arithmetic of
   iMOVE Table 5: tokens = K * h * w + (T - K) * (h / s) * (w / s); K = 0 pools every frame (row 4, 1,536).
   If a video has fewer than K - 1 local maxima, the largest remaining changes fill up, so the token count
   never depends on content (an LLM prompt can reserve its placeholders before the video is encoded).
2. Event spatial representation: an event's first frame keeps all h x w tokens.
3. Event temporal representation: the other frames are average-pooled with stride s (8x8 -> 4x4 at s = 2).
   A grid that s does not divide keeps ceil(h / s) x ceil(w / s) blocks, the last ones over the cells there are.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def event_token_count(num_frames: int, num_events: int, grid_hw: tuple[int, int], stride: int) -> int:
    """Visual tokens after compression (iMOVE Table 5): K full frames plus T - K pooled ones."""
    h, w = grid_hw
    k = min(num_events, num_frames)
    return k * h * w + (num_frames - k) * (-(-h // stride)) * (-(-w // stride))


def frame_change(frame_features: torch.Tensor) -> torch.Tensor:
    """``1 - cos(f[t-1], f[t])`` for t = 1..T-1 (shape T - 1); features are flattened per frame."""
    f = frame_features.reshape(frame_features.shape[0], -1).float()
    if f.shape[0] < 2:
        return f.new_zeros(0)
    return 1.0 - F.cosine_similarity(f[:-1], f[1:], dim=-1)


def segment_events(frame_features: torch.Tensor, num_events: int) -> list[int]:
    """First frame of every event, sorted (frame 0 first when ``num_events >= 1``); ``[]`` for K = 0."""
    t = int(frame_features.shape[0])
    if t == 0:
        raise ValueError("cannot segment a video with no frames")
    k = min(num_events, t)
    if k == 0:
        return []
    change = frame_change(frame_features).detach()  # change[i] is between frame i and frame i + 1
    if k == 1 or change.numel() == 0:
        return [0]
    n = change.numel()
    left = torch.cat([change.new_full((1,), float("-inf")), change[:-1]])
    right = torch.cat([change[1:], change.new_full((1,), float("-inf"))])
    is_peak = (change >= left) & (change > right)
    # peaks first (largest change first), then the other frames by change; ties broken by frame order
    order = sorted(range(n), key=lambda i: (not bool(is_peak[i]), -float(change[i]), i))
    starts = sorted(i + 1 for i in order[: k - 1])
    return [0] + starts


@dataclass(frozen=True)
class CompressedVideo:
    tokens: torch.Tensor  # (N, D) in frame order; a frame's tokens in row-major grid order
    frame_index: torch.Tensor  # (N,) frame each token came from
    grid_position: torch.Tensor  # (N, 2) row, column of the token's top-left cell in the frame's full grid
    tokens_per_frame: tuple[int, ...]
    event_starts: tuple[int, ...]


def compress_events(frame_grids: torch.Tensor, event_starts: list[int], stride: int) -> CompressedVideo:
    """``frame_grids`` (T, h, w, D) -> event starts at full resolution, other frames pooled at ``stride``."""
    if frame_grids.dim() != 4:
        raise ValueError(f"expected frame grids (T, h, w, D), got shape {tuple(frame_grids.shape)}")
    t, h, w, d = frame_grids.shape
    if any(not 0 <= s < t for s in event_starts):
        raise ValueError(f"event starts {event_starts} outside 0..{t - 1}")
    full = torch.zeros(t, dtype=torch.bool)
    full[list(event_starts)] = True
    # (T, D, ceil(h/s), ceil(w/s)); a grid that s does not divide (Qwen2-VL's dynamic resolution) pools its last
    # row / column of blocks over the cells there are
    pooled = F.avg_pool2d(frame_grids.permute(0, 3, 1, 2), kernel_size=stride, stride=stride, ceil_mode=True)
    pooled = pooled.permute(0, 2, 3, 1).reshape(t, -1, d)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    full_pos = torch.stack([rows.flatten(), cols.flatten()], -1)
    rows, cols = torch.meshgrid(torch.arange(0, h, stride), torch.arange(0, w, stride), indexing="ij")
    pooled_pos = torch.stack([rows.flatten(), cols.flatten()], -1)
    parts, index, pos, counts = [], [], [], []
    for i in range(t):
        part = frame_grids[i].reshape(-1, d) if full[i] else pooled[i]
        parts.append(part)
        index.append(torch.full((part.shape[0],), i, dtype=torch.long))
        pos.append(full_pos if full[i] else pooled_pos)
        counts.append(part.shape[0])
    dev = frame_grids.device
    return CompressedVideo(torch.cat(parts), torch.cat(index).to(dev), torch.cat(pos).to(dev), tuple(counts),
                           tuple(sorted(event_starts)))


class EventAwareCompression(torch.nn.Module):
    """Per-frame feature grids of one video -> event-aware token sequence. Parameter-free, as in the paper;
    boundaries come from the same features unless ``segmentation_features`` is given (e.g. CLIP)."""

    def __init__(self, num_events: int = 24, stride: int = 2) -> None:
        super().__init__()
        self.num_events = num_events
        self.stride = stride

    def token_count(self, num_frames: int, grid_hw: tuple[int, int]) -> int:
        return event_token_count(num_frames, self.num_events, grid_hw, self.stride)

    def forward(self, frame_grids: torch.Tensor, segmentation_features: torch.Tensor | None = None) -> CompressedVideo:
        feats = frame_grids if segmentation_features is None else segmentation_features
        if feats.shape[0] != frame_grids.shape[0]:
            raise ValueError(f"{feats.shape[0]} segmentation features for {frame_grids.shape[0]} frames")
        return compress_events(frame_grids, segment_events(feats, self.num_events), self.stride)
