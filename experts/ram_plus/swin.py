"""Swin Transformer image encoder, laid out so that RAM++ checkpoints load by name.

Attribute names follow the layout that the released RAM++ checkpoints are keyed by
(``visual_encoder.patch_embed.proj``, ``visual_encoder.layers.<i>.blocks.<j>.attn.qkv``, ...), including the
two persistent buffers those checkpoints carry: ``attn.relative_position_index`` for every block and
``attn_mask`` for every shifted-window block. Both are pure functions of the geometry; after loading they
are recomputed (``reset_derived_buffers``) rather than trusted, which is also what the reference loader does.

Output: ``[B, 1 + H'*W', C]``, the average-pooled token first, then the final-stage tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Value added to attention logits between tokens of different shifted-window regions. A large finite
# negative number (not -inf), the value the Swin paper's reference uses, so bf16/fp16 softmax stays finite.
SHIFT_MASK_VALUE = -100.0


def relative_position_index(window: int) -> torch.Tensor:
    """``[window**2, window**2]`` index into the ``(2*window-1)**2`` relative-bias table."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()])  # [2, N]
    delta = coords[:, :, None] - coords[:, None, :]  # [2, N, N], query minus key
    dy = delta[0] + (window - 1)
    dx = delta[1] + (window - 1)
    return dy * (2 * window - 1) + dx


def to_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, H, W, C]`` -> ``[B * nW, window*window, C]`` (row-major over windows)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def from_windows(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> torch.Tensor:
    """``[nW, window**2, window**2]``: 0 where two tokens came from the same region before the cyclic
    shift, :data:`SHIFT_MASK_VALUE` where they did not."""
    region = torch.zeros(1, height, width, 1)
    bounds = ((0, -window), (-window, -shift), (-shift, None))
    label = 0
    for y0, y1 in bounds:
        for x0, x1 in bounds:
            region[:, y0:y1, x0:x1, :] = label
            label += 1
    labels = to_windows(region, window).squeeze(-1)  # [nW, N]
    same = labels[:, None, :] == labels[:, :, None]
    return torch.where(same, torch.tensor(0.0), torch.tensor(SHIFT_MASK_VALUE))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside one window, with a learned relative-position bias per head."""

    def __init__(self, dim: int, window: int, num_heads: int) -> None:
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def reset_derived_buffers(self) -> None:
        self.relative_position_index = relative_position_index(self.window).to(self.qkv.weight.device)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bw, n, c = x.shape
        qkv = self.qkv(x).view(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        bias = bias.view(n, n, self.num_heads).permute(2, 0, 1)  # [heads, N, N]
        if mask is None:
            attn_bias = bias.unsqueeze(0)
        else:
            n_windows = mask.shape[0]
            # [B, nW, heads, N, N] -> [B*nW, heads, N, N]; windows of one image are contiguous.
            attn_bias = (bias.unsqueeze(0) + mask.unsqueeze(1)).unsqueeze(0)
            attn_bias = attn_bias.expand(bw // n_windows, -1, -1, -1, -1).reshape(bw, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, shift: int,
                 mlp_ratio: float) -> None:
        super().__init__()
        self.resolution = resolution
        # A window as large as the feature map covers it whole: no partition, no shift (as in Swin).
        if min(resolution) <= window:
            window, shift = min(resolution), 0
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        # Registered even when None so the name exists exactly where the released checkpoints have it.
        self.register_buffer("attn_mask", self._mask())

    def _mask(self) -> torch.Tensor | None:
        if self.shift == 0:
            return None
        return shifted_window_mask(self.resolution[0], self.resolution[1], self.window, self.shift)

    def reset_derived_buffers(self) -> None:
        self.attn.reset_derived_buffers()
        if self.shift:
            self.attn_mask = self._mask().to(self.norm1.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, length, c = x.shape
        y = self.norm1(x).view(b, h, w, c)
        if self.shift:
            y = torch.roll(y, shifts=(-self.shift, -self.shift), dims=(1, 2))
        mask = None if self.attn_mask is None else self.attn_mask.to(y.dtype)
        y = self.attn(to_windows(y, self.window), mask)
        y = from_windows(y, self.window, h, w)
        if self.shift:
            y = torch.roll(y, shifts=(self.shift, self.shift), dims=(1, 2))
        x = x + y.reshape(b, length, c)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (order: (0,0), (1,0), (0,1), (1,1)), LayerNorm, linear 4C -> 2C."""

    def __init__(self, resolution: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class SwinStage(nn.Module):
    def __init__(self, dim: int, resolution: tuple[int, int], depth: int, num_heads: int, window: int,
                 mlp_ratio: float, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, resolution, num_heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio)
            for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nn.Module):
    def __init__(self, image_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"Swin encoder expects {self.image_size}x{self.image_size} inputs, got {tuple(x.shape[-2:])}")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, embed_dim: int, depths: tuple[int, ...],
                 num_heads: tuple[int, ...], window: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, embed_dim)
        grid = image_size // patch_size
        self.layers = nn.ModuleList()
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            res = (grid // 2**i, grid // 2**i)
            self.layers.append(
                SwinStage(embed_dim * 2**i, res, depth, heads, window, mlp_ratio, downsample=i < len(depths) - 1)
            )
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)

    def reset_derived_buffers(self) -> None:
        for stage in self.layers:
            for block in stage.blocks:
                block.reset_derived_buffers()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        for stage in self.layers:
            x = stage(x)
        x = self.norm(x)
        return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
