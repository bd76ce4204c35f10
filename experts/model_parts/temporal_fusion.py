"""MotionBench section 4 (appendix 8): video feature compression paradigms around the Qwen2-VL vision tower.

:class:`TemporalFusionTower` wraps ``Qwen2VisionTransformerPretrainedModel`` as transformers builds it and
replaces ``model.model.visual``. Convention shared with the LLM side: the batch's ``video_grid_thw`` holds the
*compressed* grid (t / k, h, w), which is what the decoder's placeholders and M-RoPE positions describe,
while ``pixel_values_videos`` still carries all t slots; the tower sees ``k`` times more pixel rows than the
grid names and expands it itself. A call whose rows match the grid (images) goes to the plain tower.
:func:`compress_video_placeholders` rewrites a processor batch into that convention.

Units: a *slot* is one temporal position of the tower's grid (``temporal_patch_size`` = 2 frames for
Qwen2-VL); rate k fuses k neighbouring slots into one slot's worth of decoder tokens.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from experts.model_parts.config import TemporalFusionConfig

# methods that only touch the tower's merged output (the plain tower encodes every slot alone): they work on any
# tower with Qwen2-VL's calling convention, Qwen2.5-VL's windowed one included
AFTER_MERGER = ("qformer", "post_pool", "post_mlp")
# methods that change the encoder's own layers or attention segments: written for the Qwen2-VL tower's blocks
INSIDE_ENCODER = ("pre_encoder", "kangaroo", "te_fusion")
_SEQ_PAD = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "labels": -100}


def _averaging_projection(rate: int, dim: int) -> nn.Linear:
    """Linear(k * D -> D) that starts as the mean of the k slots, so fine-tuning starts from the tower's own
    features (and equals ``post_pool`` before training)."""
    proj = nn.Linear(rate * dim, dim)
    with torch.no_grad():
        proj.weight.copy_(torch.cat([torch.eye(dim) / rate] * rate, dim=1))
        proj.bias.zero_()
    return proj


class _QFormerBlock(nn.Module):
    """Pre-norm block of a Q-Former: queries attend to each other, then to the group's tokens, then an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_kv, self.norm_mlp = (nn.LayerNorm(dim) for _ in range(4))
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        x = self.norm_self(q)
        q = q + self.self_attn(x, x, x, need_weights=False)[0]
        kv = self.norm_kv(kv)
        q = q + self.cross_attn(self.norm_cross(q), kv, kv, need_weights=False)[0]
        return q + self.mlp(self.norm_mlp(q))


class GroupQFormer(nn.Module):
    """MotionBench appendix 8, item 4: a small Q-Former learned from scratch after the encoder and merger. Each
    group of k slots' merged tokens (k x h x w of them) is one key/value sequence; h x w learned queries read
    it and become the group's tokens, so k slots cost one slot's worth of decoder tokens.

    Choices the appendix leaves open: the queries are a learned ``grid x grid`` map, bilinearly resized to the
    slot's h x w (so any frame size works, and at 224 px the map is used as is); the keys get a learned spatial
    map (same resizing) and a learned per-slot embedding, so the Q-Former knows where and when a token is; both
    start at zero. Blocks are BLIP-2 style (self-attention among queries, cross-attention to the group, MLP),
    pre-norm, ``layers`` deep, with the widest of 8 / 4 / 2 / 1 heads that divides the width."""

    def __init__(self, dim: int, rate: int, layers: int = 2, grid: int = 8) -> None:
        super().__init__()
        heads = next(h for h in (8, 4, 2, 1) if dim % h == 0)
        self.rate = rate
        self.query = nn.Parameter(torch.randn(grid, grid, dim) * 0.02)
        self.key_pos = nn.Parameter(torch.zeros(grid, grid, dim))
        self.slot_pos = nn.Parameter(torch.zeros(rate, dim))
        self.blocks = nn.ModuleList(_QFormerBlock(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    @staticmethod
    def _resized(grid_map: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if grid_map.shape[:2] == (h, w):
            return grid_map
        x = grid_map.permute(2, 0, 1).unsqueeze(0)
        return nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """``groups`` (G, k, h, w, D) merged tokens -> (G, h * w, D)."""
        g, k, h, w, d = groups.shape
        kv = groups + self._resized(self.key_pos, h, w)[None, None] + self.slot_pos[None, :, None, None]
        kv = kv.reshape(g, k * h * w, d)
        q = self._resized(self.query, h, w).reshape(1, h * w, d).expand(g, -1, -1)
        for blk in self.blocks:
            q = blk(q, kv)
        return self.norm(q)


class TemporalFusionTower(nn.Module):
    def __init__(self, tower: nn.Module, cfg: TemporalFusionConfig) -> None:
        super().__init__()
        if not all(hasattr(tower, a) for a in ("patch_embed", "blocks", "merger", "rotary_pos_emb")):
            raise TypeError(f"{type(tower).__name__} is not a Qwen2-VL vision tower (patch_embed, blocks, merger)")
        self.tower = tower
        self.config = tower.config
        self.method = cfg.method
        self.rate = cfg.rate
        self.spatial_merge_size = tower.spatial_merge_size
        out_dim = tower.merger.mlp[-1].out_features
        embed = tower.patch_embed
        if cfg.method == "pre_encoder":
            k, tp = cfg.rate, embed.temporal_patch_size
            conv = nn.Conv3d(embed.in_channels, embed.embed_dim, kernel_size=[k * tp, embed.patch_size, embed.patch_size],
                             stride=[k * tp, embed.patch_size, embed.patch_size], bias=False)
            with torch.no_grad():  # inflate the checkpoint's kernel over time: starts as the mean over the k slots
                conv.weight.copy_(embed.proj.weight.repeat(1, 1, k, 1, 1) / k)
            self.fused_patch_embed = conv.to(embed.proj.weight.dtype)
        if cfg.method == "post_mlp":  # over the merged tokens, after the merger
            self.temporal_proj = _averaging_projection(cfg.rate, out_dim).to(tower.dtype)
        if cfg.method in ("kangaroo", "te_fusion"):  # over the encoder's per-patch states, before the merger
            self.temporal_proj = _averaging_projection(cfg.rate, embed.embed_dim).to(tower.dtype)
        if cfg.method == "qformer":
            self.qformer = GroupQFormer(out_dim, cfg.rate, cfg.qformer_layers, cfg.qformer_query_grid).to(tower.dtype)
        if cfg.method == "te_fusion":
            self.slot_embed = nn.Parameter(torch.zeros(cfg.rate, embed.embed_dim, dtype=tower.dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.dtype

    @property
    def device(self) -> torch.device:
        return self.tower.device

    def output_tokens_per_video(self, grid_thw: torch.Tensor) -> list[int]:
        """Decoder tokens per video for a *compressed* grid (as in the batch)."""
        return (grid_thw.prod(-1) // self.spatial_merge_size**2).tolist()

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        rows = int(hidden_states.shape[0])
        plain = int(grid_thw.prod(-1).sum())
        if rows == plain:  # images, or a batch that was not rewritten for fusion
            return self.tower(hidden_states, grid_thw=grid_thw, **kwargs)
        if rows != plain * self.rate:
            raise ValueError(
                f"{rows} pixel rows for a grid of {plain} patches: a rate-{self.rate} fused video needs "
                f"{plain * self.rate}; rewrite the batch with compress_video_placeholders first"
            )
        k = self.rate
        full = grid_thw.clone()
        full[:, 0] *= k
        per_video = (full.prod(-1)).tolist()
        chunks = torch.split(hidden_states, per_video)
        if self.method == "none":
            kept = [c.view(int(g[0]), k, -1, c.shape[-1])[:, 0].reshape(-1, c.shape[-1]) for c, g in zip(chunks, grid_thw)]
            return self.tower(torch.cat(kept), grid_thw=grid_thw, **kwargs)
        if self.method == "pre_encoder":
            embedded = torch.cat([self._fused_embed(c, int(g[0])) for c, g in zip(chunks, grid_thw)])
            hidden, merged = self._encode(embedded, grid_thw, self._slot_seqlens(grid_thw, 1))
            return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=merged)
        m = self.spatial_merge_size
        if self.method in AFTER_MERGER:
            # every slot encoded alone by the plain tower (its own attention segments are one slot), then fused
            out = self.tower(hidden_states, grid_thw=full, **kwargs)
            out_tokens = torch.split(out.pooler_output, (full.prod(-1) // m**2).tolist())
            fused = torch.cat([self._fuse(tok, int(g[0]), (int(g[1]) // m, int(g[2]) // m))
                               for tok, g in zip(out_tokens, grid_thw)])
            # last_hidden_state: the encoder's per-patch states before the merger, as the plain tower returns them
            return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=fused)
        # kangaroo and te_fusion: encoder, then the k slots' per-patch states concatenated on the hidden axis and
        # projected (Linear(k * C -> C)), then the tower's merger. They differ only in the attention segments:
        # every slot alone (Kangaroo) or the group of k slots jointly, with a learned slot embedding (TE Fusion)
        embedded = self.tower.patch_embed(hidden_states)
        if self.method == "te_fusion":
            embedded = embedded + self._slot_embedding(full)
        group = k if self.method == "te_fusion" else 1
        hidden = self._encode(embedded, full, self._slot_seqlens(full, group), merge=False)
        fused = torch.cat([self._fuse_states(c, int(g[0])) for c, g in
                           zip(torch.split(hidden, full.prod(-1).tolist()), grid_thw)])
        # last_hidden_state: the temporally fused per-patch states, as many as the compressed grid names
        return BaseModelOutputWithPooling(last_hidden_state=fused, pooler_output=self.tower.merger(fused))

    # -- pieces ---------------------------------------------------------------------------------------------
    def _fused_embed(self, chunk: torch.Tensor, t_out: int) -> torch.Tensor:
        """Pixel rows of k neighbouring slots -> one slot, concatenated along time inside each patch."""
        pe = self.tower.patch_embed
        c, tp, p, k = pe.in_channels, pe.temporal_patch_size, pe.patch_size, self.rate
        x = chunk.view(t_out, k, -1, c, tp, p, p).permute(0, 2, 3, 1, 4, 5, 6)  # (t, hw, C, k, tp, p, p)
        x = x.reshape(-1, c, k * tp, p, p).to(self.fused_patch_embed.weight.dtype)
        return self.fused_patch_embed(x).view(-1, pe.embed_dim)

    def _slot_embedding(self, full: torch.Tensor) -> torch.Tensor:
        idx = torch.cat([
            (torch.arange(int(t), device=full.device) % self.rate).repeat_interleave(int(h * w)) for t, h, w in full.tolist()
        ])
        return self.slot_embed[idx]

    @staticmethod
    def _slot_seqlens(grid: torch.Tensor, group: int) -> torch.Tensor:
        """Attention segments: ``group`` consecutive slots attend to each other (1 = Qwen2-VL's per-slot)."""
        lens = []
        for t, h, w in grid.tolist():
            lens.extend([group * h * w] * (t // group))
        return nn.functional.pad(torch.tensor(lens, device=grid.device).cumsum(0, dtype=torch.int32), (1, 0))

    def _encode(self, embedded: torch.Tensor, grid: torch.Tensor, cu_seqlens: torch.Tensor,
                merge: bool = True) -> Any:
        """The tower's blocks and merger over already-embedded patches with the given attention segments;
        returns (per-patch states, merged tokens), or the per-patch states alone without ``merge``."""
        from transformers.utils.generic import get_max_seqlen
        from transformers.vision_utils import get_vision_position_ids

        tower = self.tower
        position_ids = get_vision_position_ids(grid, tower.spatial_merge_size)
        position_embeddings = tower.rotary_pos_emb(embedded, position_ids)
        max_seqlen = get_max_seqlen(cu_seqlens, tower.config)
        h = embedded
        for blk in tower.blocks:
            h = blk(h, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, position_embeddings=position_embeddings)
        return (h, tower.merger(h)) if merge else h

    def _fuse_states(self, states: torch.Tensor, t_out: int) -> torch.Tensor:
        """Kangaroo and TE Fusion: (t * hw, C) per-patch states -> (t/k * hw, C), the k slots of a patch
        position concatenated on the hidden axis and projected, before the merger (MotionBench appendix 8: "the
        tokens of K frames are concatenated along the hidden-size dimension, downsampled and projected"; the
        pseudo-code's ``concat_neighbor_hidden`` then ``downsample_with_proj``). Patches keep the processor's
        order inside a slot (2 x 2 merge blocks contiguous), so the merger still finds its blocks."""
        x = states.view(t_out, self.rate, -1, states.shape[-1]).permute(0, 2, 1, 3)  # (t/k, hw, k, C)
        return self.temporal_proj(x.reshape(-1, self.rate * states.shape[-1]))

    def _fuse(self, merged: torch.Tensor, t_out: int, grid_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """The after-merger methods (``post_pool``, ``qformer``, ``post_mlp``) over (t * n, D) merged tokens."""
        x = merged.view(t_out, self.rate, -1, merged.shape[-1])  # (t/k, k, n, D)
        if self.method == "post_pool":
            return x.mean(1).reshape(-1, merged.shape[-1])
        if self.method == "qformer":
            h, w = grid_hw
            return self.qformer(x.view(t_out, self.rate, h, w, -1)).reshape(-1, merged.shape[-1])
        x = x.permute(0, 2, 1, 3).reshape(-1, self.rate * merged.shape[-1])  # (t/k * n, k * D)
        return self.temporal_proj(x)


def _video_runs(row: torch.Tensor, valid: torch.Tensor, video_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each contiguous run of video placeholders in one row."""
    pos = torch.nonzero((row == video_token_id) & valid).flatten().tolist()
    runs, start = [], None
    for j, p in enumerate(pos):
        if start is None:
            start = p
        if j + 1 == len(pos) or pos[j + 1] != p + 1:
            runs.append((start, p + 1))
            start = None
    return runs


def shrink_video_runs(batch: dict, new_lengths: Any, video_token_id: int, pad_token_id: int,
                      padding_side: str = "left") -> dict:
    """Shorten each video's run of placeholder tokens to ``new_lengths(i, run_length)`` (videos numbered in
    batch order, as in ``video_grid_thw``) and re-pad every sequence tensor on ``padding_side``."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    keep_rows, video = [], 0
    for row, m in zip(ids, mask):
        valid = m.bool()
        keep = valid.clone()
        for a, b in _video_runs(row, valid, video_token_id):
            n = int(new_lengths(video, b - a))
            if not 0 < n <= b - a:
                raise ValueError(f"video {video}: cannot shrink {b - a} placeholders to {n}")
            keep[a + n:b] = False
            video += 1
        keep_rows.append(keep)
    width = max(int(k.sum()) for k in keep_rows)
    out = dict(batch)
    for key, fill in _SEQ_PAD.items():
        if key not in batch:
            continue
        fill = pad_token_id if fill is None else fill
        rows = []
        for src, keep in zip(batch[key], keep_rows):
            vals = src[keep]
            pad = vals.new_full((width - vals.shape[0],), fill)
            rows.append(torch.cat([pad, vals]) if padding_side == "left" else torch.cat([vals, pad]))
        out[key] = torch.stack(rows)
    return out


def compress_video_placeholders(batch: dict, rate: int, video_token_id: int, pad_token_id: int,
                                padding_side: str = "left") -> dict:
    """Rewrite a Qwen2-VL processor batch for a rate-k fused tower: each video's run of placeholder tokens
    shrinks to 1/k (the first tokens are kept; they are all the same id), sequence tensors are re-padded on
    ``padding_side`` and ``video_grid_thw`` becomes the compressed grid. Pixels are left untouched."""
    if rate == 1 or "video_grid_thw" not in batch:
        return dict(batch)
    grid = batch["video_grid_thw"]
    if bool((grid[:, 0] % rate).any()):
        raise ValueError(f"video time slots {grid[:, 0].tolist()} are not all divisible by the fusion rate {rate}; "
                         f"sample a multiple of {rate} x temporal_patch_size frames")

    def shrink(_video: int, run: int) -> int:
        if run % rate:
            raise ValueError(f"a video placeholder run of {run} tokens is not divisible by the rate {rate}")
        return run // rate

    out = shrink_video_runs(batch, shrink, video_token_id, pad_token_id, padding_side)
    new_grid = grid.clone()
    new_grid[:, 0] //= rate
    out["video_grid_thw"] = new_grid
    if "second_per_grid_ts" in batch:  # Qwen2.5-VL times slots in seconds: a fused slot spans k of them
        out["second_per_grid_ts"] = batch["second_per_grid_ts"] * rate
    return out
