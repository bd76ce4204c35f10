"""RAM++ (Recognize Anything Plus) tagging model as plain torch modules: construction only, no weights.

Structure and parameter names follow the released ``ram_plus_swin_large_14m.pth`` (its ``model`` entry):

* ``visual_encoder``  Swin transformer (``swin.py``); output: pooled token + final-stage tokens;
* ``image_proj``      linear, vision width -> 512 (the CLIP embedding width the tag descriptions live in);
* ``label_embed``     ``[num_tags * descriptions_per_tag, 512]``: 51 CLIP text embeddings of LLM-written
                      descriptions per tag, stored tag-major;
* ``wordvec_proj``    linear 512 -> head width (an identity, without parameters, when the widths agree);
* ``tagging_head``    query-to-label decoder: BERT layers whose self-attention was removed, so each layer
                      is cross-attention (label queries attend to image tokens) + feed-forward. Keys:
                      ``tagging_head.encoder.layer.<i>.{crossattention.self.{query,key,value},
                      crossattention.output.{dense,LayerNorm}, intermediate.dense, output.{dense,LayerNorm}}``;
* ``fc``              linear head width -> 1, one logit per tag query;
* ``reweight_scale``  a trained scalar (log of the inverse temperature of description reweighting),
                      initialised to ``log(1/0.07)`` as in the reference model, where it is an
                      ``nn.Parameter`` and so part of the state dict.

Description reweighting (RAM++ paper, "multi-grained text supervision"): the image's pooled embedding is
L2-normalised, compared with every description embedding at temperature ``exp(reweight_scale)``, a softmax
over each tag's descriptions gives weights, and the tag query is the weighted sum of its descriptions.
Checkpoints saved by other code bases may lack ``reweight_scale`` or carry a CLIP-style ``logit_scale``;
``loading.py`` accepts those two variants explicitly (with a logged note), nothing else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from .swin import SwinTransformer

OFFICIAL_NUM_TAGS = 4585
OFFICIAL_DESCRIPTIONS_PER_TAG = 51
REWEIGHT_TEMPERATURE = 0.07
# Initial value of the trained ``reweight_scale`` in the reference model; also what a checkpoint without
# that entry is loaded with.
DEFAULT_REWEIGHT_SCALE = math.log(1 / REWEIGHT_TEMPERATURE)


@dataclass(frozen=True)
class RamPlusConfig:
    """Geometry of one RAM++ model. ``for_variant`` gives the released configurations."""

    image_size: int = 384
    patch_size: int = 4
    swin_embed_dim: int = 192
    swin_depths: tuple[int, ...] = (2, 2, 18, 2)
    swin_num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    mlp_ratio: float = 4.0
    text_embed_dim: int = 512  # CLIP embedding width of image_proj output and label_embed rows
    num_tags: int = OFFICIAL_NUM_TAGS
    descriptions_per_tag: int = OFFICIAL_DESCRIPTIONS_PER_TAG
    # Query-to-label head (the reference's q2l_config.json, with encoder_width forced to 512).
    head_hidden_size: int = 768
    head_num_layers: int = 2
    head_num_heads: int = 4
    head_intermediate_size: int = 3072
    head_layer_norm_eps: float = 1e-12

    @property
    def vision_width(self) -> int:
        return self.swin_embed_dim * 2 ** (len(self.swin_depths) - 1)

    @classmethod
    def for_variant(cls, variant: str, image_size: int | None = None, **overrides) -> "RamPlusConfig":
        """``swin_l`` / ``swin_b`` at 384 px (window 12) or 224 px (window 7), or the ``tiny`` miniature."""
        if variant == "tiny":
            cfg = cls(image_size=64, patch_size=4, swin_embed_dim=16, swin_depths=(2, 2, 2), swin_num_heads=(1, 2, 4),
                      window_size=4, text_embed_dim=16, num_tags=24, descriptions_per_tag=3, head_hidden_size=32,
                      head_num_layers=2, head_num_heads=2, head_intermediate_size=64)
            if image_size not in (None, cfg.image_size):
                raise ValueError(f"the tiny RAM++ variant is built for {cfg.image_size} px inputs, not {image_size}")
            return replace(cfg, **overrides)
        size = 384 if image_size is None else image_size
        if size not in (224, 384):
            raise ValueError(f"RAM++ {variant} exists for image_size 224 or 384, not {size}")
        window = 12 if size == 384 else 7
        if variant == "swin_l":
            swin = dict(swin_embed_dim=192, swin_num_heads=(6, 12, 24, 48))
        elif variant == "swin_b":
            swin = dict(swin_embed_dim=128, swin_num_heads=(4, 8, 16, 32))
        else:
            raise ValueError(f"unknown RAM++ variant {variant!r}; use 'swin_l', 'swin_b' or 'tiny'")
        return replace(cls(image_size=size, window_size=window, swin_depths=(2, 2, 18, 2), **swin), **overrides)


class CrossAttention(nn.Module):
    """Queries from the label side, keys and values from the image tokens."""

    def __init__(self, hidden: int, context_width: int, num_heads: int) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"head width {hidden} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context_width, hidden)
        self.value = nn.Linear(context_width, hidden)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        heads, hd = self.num_heads, d // self.num_heads
        q = self.query(x).view(b, n, heads, hd).transpose(1, 2)
        k = self.key(context).view(b, -1, heads, hd).transpose(1, 2)
        v = self.value(context).view(b, -1, heads, hd).transpose(1, 2)
        # Every image token is valid (the reference passes an all-ones mask), so no mask here.
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, n, d)


class ResidualOutput(nn.Module):
    """Post-norm residual: ``LayerNorm(dense(x) + residual)``."""

    def __init__(self, in_width: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)  # noqa: N815 - name fixed by the checkpoint

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class CrossAttentionBlock(nn.Module):
    def __init__(self, hidden: int, context_width: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.self = CrossAttention(hidden, context_width, num_heads)
        self.output = ResidualOutput(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, context), x)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"


class TaggingLayer(nn.Module):
    def __init__(self, cfg: RamPlusConfig) -> None:
        super().__init__()
        h, eps = cfg.head_hidden_size, cfg.head_layer_norm_eps
        self.crossattention = CrossAttentionBlock(h, cfg.text_embed_dim, cfg.head_num_heads, eps)
        self.intermediate = Intermediate(h, cfg.head_intermediate_size)
        self.output = ResidualOutput(cfg.head_intermediate_size, h, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.crossattention(x, context)
        return self.output(self.intermediate(x), x)


class TaggingEncoder(nn.Module):
    def __init__(self, cfg: RamPlusConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(TaggingLayer(cfg) for _ in range(cfg.head_num_layers))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, context)
        return x


class TaggingHead(nn.Module):
    """Query-to-label decoder (Query2Label style): tag queries cross-attend to image tokens."""

    def __init__(self, cfg: RamPlusConfig) -> None:
        super().__init__()
        self.encoder = TaggingEncoder(cfg)

    def forward(self, label_queries: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(label_queries, image_tokens)


class RamPlusModel(nn.Module):
    """RAM++ tagging path: normalised ``[B, 3, S, S]`` images -> ``[B, num_tags]`` logits."""

    def __init__(self, cfg: RamPlusConfig) -> None:
        super().__init__()
        self.config = cfg
        self.visual_encoder = SwinTransformer(cfg.image_size, cfg.patch_size, cfg.swin_embed_dim, cfg.swin_depths,
                                              cfg.swin_num_heads, cfg.window_size, cfg.mlp_ratio)
        self.image_proj = nn.Linear(cfg.vision_width, cfg.text_embed_dim)
        self.label_embed = nn.Parameter(torch.zeros(cfg.num_tags * cfg.descriptions_per_tag, cfg.text_embed_dim))
        if cfg.head_hidden_size != cfg.text_embed_dim:
            self.wordvec_proj: nn.Module = nn.Linear(cfg.text_embed_dim, cfg.head_hidden_size)
        else:
            self.wordvec_proj = nn.Identity()
        self.tagging_head = TaggingHead(cfg)
        self.fc = nn.Linear(cfg.head_hidden_size, 1)
        self.reweight_scale = nn.Parameter(torch.tensor(DEFAULT_REWEIGHT_SCALE))

    def reset_derived_buffers(self) -> None:
        """Recompute buffers that are functions of the configuration (after meta-device construction or
        after loading a checkpoint whose stored copies should not be trusted)."""
        self.visual_encoder.reset_derived_buffers()

    def init_random_weights(self, generator: torch.Generator | None = None) -> None:
        """Random initialisation (truncated normal 0.02 for linear/bias tables, unit LayerNorms, unit-norm
        description embeddings). Used by the ``tiny`` profile; real weights come from a checkpoint."""
        def normal_(t: torch.Tensor, std: float = 0.02) -> None:
            with torch.no_grad():
                t.copy_(torch.randn(t.shape, generator=generator).clamp_(-2, 2) * std)

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for stage in self.visual_encoder.layers:
            for block in stage.blocks:
                normal_(block.attn.relative_position_bias_table)
        with torch.no_grad():
            emb = torch.randn(self.label_embed.shape, generator=generator)
            self.label_embed.copy_(F.normalize(emb, dim=-1))
            self.reweight_scale.fill_(DEFAULT_REWEIGHT_SCALE)

    def reweighted_label_queries(self, image_cls: torch.Tensor) -> torch.Tensor:
        """``[B, E]`` pooled image embeddings -> ``[B, num_tags, E]`` description-weighted tag embeddings."""
        cfg = self.config
        cls = image_cls / image_cls.norm(dim=-1, keepdim=True)
        descriptions = self.label_embed.view(cfg.num_tags, cfg.descriptions_per_tag, -1)
        sims = torch.einsum("be,kde->bkd", cls, descriptions) * self.reweight_scale.exp().to(cls.dtype)
        weights = sims.softmax(dim=-1)
        return torch.einsum("bkd,kde->bke", weights, descriptions)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image_tokens = self.image_proj(self.visual_encoder(images))  # [B, 1 + L, E]
        queries = F.relu(self.wordvec_proj(self.reweighted_label_queries(image_tokens[:, 0])))
        hidden = self.tagging_head(queries, image_tokens)
        return self.fc(hidden).squeeze(-1)


def build_ram_plus_model(cfg: RamPlusConfig, device: str | torch.device | None = None) -> RamPlusModel:
    """Construct a RAM++ model. ``device="meta"`` allocates nothing (shapes only, instant even for Swin-L);
    a model built on ``meta`` must get its tensors from ``load_state_dict(..., assign=True)`` followed by
    ``reset_derived_buffers()``."""
    if device is None:
        return RamPlusModel(cfg)
    with torch.device(device):
        return RamPlusModel(cfg)


def state_dict_shapes(model: nn.Module) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in model.state_dict().items()}


def official_state_dict_shapes(variant: str = "swin_l", image_size: int = 384,
                               num_tags: int = OFFICIAL_NUM_TAGS,
                               descriptions_per_tag: int = OFFICIAL_DESCRIPTIONS_PER_TAG) -> dict[str, list[int]]:
    """State-dict names and shapes of a released configuration, built on the meta device."""
    overrides = {} if variant == "tiny" else dict(num_tags=num_tags, descriptions_per_tag=descriptions_per_tag)
    cfg = RamPlusConfig.for_variant(variant, None if variant == "tiny" else image_size, **overrides)
    return state_dict_shapes(build_ram_plus_model(cfg, device="meta"))
