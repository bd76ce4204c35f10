"""The reference RAM++ state-dict layout, written by hand from the recognize-anything code.

Independent of ``experts/ram_plus``: every key and shape below was derived from reading the reference
(commit 7cb804a): ``ram/models/ram_plus.py`` (``RAM_plus.__init__`` and ``del_selfattention``),
``ram/models/swin_transformer.py`` (``SwinTransformer``, ``BasicLayer``, ``SwinTransformerBlock``,
``WindowAttention``, ``PatchMerging``, ``PatchEmbed``), ``ram/models/bert.py`` (``BertModel``,
``BertLayer``, ``BertAttention``, ``BertSelfAttention``) and the configs ``ram/configs/q2l_config.json``
and ``ram/configs/swin/config_swin{L,B}_{224,384}.json``. Nothing here imports project code.

Facts used, with where they come from:

* RAM_plus builds ``visual_encoder`` (Swin, ``patch_size=4``, ``in_chans=3``, ``qkv_bias=True``,
  ``ape=False`` so no ``absolute_pos_embed``, ``patch_norm=True`` so ``patch_embed.norm`` exists, no
  classification head: the ``head`` line is commented out, ``avgpool`` has no parameters);
  ``image_proj = Linear(vision_width, 512)``; ``label_embed = Parameter(zeros(num_class * 51, 512))``;
  ``wordvec_proj = Linear(512, hidden)`` unless ``hidden == 512`` (then ``Identity``);
  ``fc = Linear(hidden, 1)``; ``reweight_scale = Parameter(ones([]) * log(1/0.07))`` (a 0-d tensor).
  The width 512 is written as a literal in ram_plus.py (the CLIP text width); it is a parameter here only
  so that a miniature can use a smaller one. The loss modules hold no tensors.
* ``tagging_head = BertModel(q2l_config, add_pooling_layer=False)`` with ``encoder_width = 512``;
  ``del_selfattention`` deletes ``tagging_head.embeddings`` and every layer's ``attention``, leaving per
  layer ``crossattention`` (``self.query: Linear(hidden, hidden)``, ``self.key`` / ``self.value``:
  ``Linear(encoder_width, hidden)``, ``output.dense: Linear(hidden, hidden)``, ``output.LayerNorm``),
  ``intermediate.dense: Linear(hidden, intermediate)``, ``output.dense: Linear(intermediate, hidden)``,
  ``output.LayerNorm``. q2l_config.json: hidden 768, intermediate 3072, 2 layers (absolute position
  embeddings, so no ``distance_embedding``).
* Swin stage ``i`` works at ``dim = embed_dim * 2**i`` on a ``(S/4) / 2**i`` square grid; blocks alternate
  shift 0 and ``window // 2``; a block whose grid side is ``<= window`` uses ``window = side`` and no
  shift. Each block registers ``attn.relative_position_index`` ``[w*w, w*w]`` (int64) and, only when
  shifted, ``attn_mask`` ``[num_windows, w*w, w*w]``; both are buffers and so are in the state dict.
  ``relative_position_bias_table`` is ``[(2w-1)**2, heads]``; ``mlp`` hidden width is ``4 * dim``.
  Every stage but the last ends with ``PatchMerging``: ``norm`` over ``4*dim``, ``reduction``
  ``Linear(4*dim, 2*dim, bias=False)``. The encoder ends with ``norm`` over the last width.
"""
from __future__ import annotations

from dataclasses import dataclass

# (embed_dim, heads per stage, window) of the reference Swin configs, by (variant, image size)
SWIN_CONFIGS = {
    ("swin_l", 384): (192, (6, 12, 24, 48), 12),
    ("swin_l", 224): (192, (6, 12, 24, 48), 7),
    ("swin_b", 384): (128, (4, 8, 16, 32), 12),
    ("swin_b", 224): (128, (4, 8, 16, 32), 7),
}


@dataclass(frozen=True)
class Geometry:
    image_size: int = 384
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window: int = 12
    num_tags: int = 4585
    descriptions_per_tag: int = 51
    clip_width: int = 512        # a literal in ram_plus.py
    hidden: int = 768            # q2l_config.json
    intermediate: int = 3072     # q2l_config.json
    head_layers: int = 2         # q2l_config.json

    @classmethod
    def released(cls, variant: str = "swin_l", image_size: int = 384) -> "Geometry":
        embed, heads, window = SWIN_CONFIGS[(variant, image_size)]
        return cls(image_size=image_size, embed_dim=embed, num_heads=heads, window=window)


# The miniature the project's ``tiny`` variant uses: same layout rules at 64 px, 24 tags x 3 descriptions.
TINY = Geometry(image_size=64, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4), window=4, num_tags=24,
                descriptions_per_tag=3, clip_width=16, hidden=32, intermediate=64, head_layers=2)


def _linear(prefix: str, out_f: int, in_f: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    d = {f"{prefix}.weight": (out_f, in_f)}
    if bias:
        d[f"{prefix}.bias"] = (out_f,)
    return d


def _norm(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def official_layout(g: Geometry = Geometry()) -> dict[str, tuple[int, ...]]:
    """``{state-dict key: shape}`` of the reference RAM_plus model built with geometry ``g``."""
    s: dict[str, tuple[int, ...]] = {}
    ve = "visual_encoder"
    s[f"{ve}.patch_embed.proj.weight"] = (g.embed_dim, 3, 4, 4)
    s[f"{ve}.patch_embed.proj.bias"] = (g.embed_dim,)
    s.update(_norm(f"{ve}.patch_embed.norm", g.embed_dim))
    side0 = g.image_size // 4
    for i, (depth, heads) in enumerate(zip(g.depths, g.num_heads)):
        dim = g.embed_dim * 2 ** i
        side = side0 // 2 ** i
        for j in range(depth):
            window, shift = g.window, (0 if j % 2 == 0 else g.window // 2)
            if side <= window:
                window, shift = side, 0
            b = f"{ve}.layers.{i}.blocks.{j}"
            s.update(_norm(f"{b}.norm1", dim))
            s[f"{b}.attn.relative_position_bias_table"] = ((2 * window - 1) ** 2, heads)
            s[f"{b}.attn.relative_position_index"] = (window * window, window * window)
            s.update(_linear(f"{b}.attn.qkv", 3 * dim, dim))
            s.update(_linear(f"{b}.attn.proj", dim, dim))
            s.update(_norm(f"{b}.norm2", dim))
            s.update(_linear(f"{b}.mlp.fc1", 4 * dim, dim))
            s.update(_linear(f"{b}.mlp.fc2", dim, 4 * dim))
            if shift > 0:
                s[f"{b}.attn_mask"] = ((side // window) ** 2, window * window, window * window)
        if i < len(g.depths) - 1:
            s.update(_norm(f"{ve}.layers.{i}.downsample.norm", 4 * dim))
            s.update(_linear(f"{ve}.layers.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False))
    vision_width = g.embed_dim * 2 ** (len(g.depths) - 1)
    s.update(_norm(f"{ve}.norm", vision_width))
    s.update(_linear("image_proj", g.clip_width, vision_width))
    s["label_embed"] = (g.num_tags * g.descriptions_per_tag, g.clip_width)
    if g.hidden != g.clip_width:
        s.update(_linear("wordvec_proj", g.hidden, g.clip_width))
    for k in range(g.head_layers):
        L = f"tagging_head.encoder.layer.{k}"
        s.update(_linear(f"{L}.crossattention.self.query", g.hidden, g.hidden))
        s.update(_linear(f"{L}.crossattention.self.key", g.hidden, g.clip_width))
        s.update(_linear(f"{L}.crossattention.self.value", g.hidden, g.clip_width))
        s.update(_linear(f"{L}.crossattention.output.dense", g.hidden, g.hidden))
        s.update(_norm(f"{L}.crossattention.output.LayerNorm", g.hidden))
        s.update(_linear(f"{L}.intermediate.dense", g.intermediate, g.hidden))
        s.update(_linear(f"{L}.output.dense", g.hidden, g.intermediate))
        s.update(_norm(f"{L}.output.LayerNorm", g.hidden))
    s.update(_linear("fc", 1, g.hidden))
    s["reweight_scale"] = ()
    return s


def random_official_state_dict(g: Geometry, seed: int = 0, reweight_scale: float | None = None):
    """A state dict with the reference layout and random values (int64 index buffers, float elsewhere).

    Values are arbitrary but well scaled: N(0, 0.02) for weights, ones/zeros for LayerNorms, unit-norm
    description embeddings, so the model's outputs are finite. ``reweight_scale`` defaults to a value
    different from the reference initialisation, so a test can tell whether it was used.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in official_layout(g).items():
        if key.endswith("relative_position_index"):
            window2 = shape[0]
            out[key] = torch.randint(0, window2, shape, generator=gen, dtype=torch.int64)
        elif key.endswith("attn_mask"):
            out[key] = torch.where(torch.rand(shape, generator=gen) < 0.5, 0.0, -100.0)
        elif key == "reweight_scale":
            out[key] = torch.tensor(1.5 if reweight_scale is None else reweight_scale)
        elif key == "label_embed":
            e = torch.randn(shape, generator=gen)
            out[key] = e / e.norm(dim=-1, keepdim=True)
        elif ("norm" in key.lower()) and key.endswith(".weight"):
            out[key] = torch.ones(shape)
        elif key.endswith(".bias"):
            out[key] = torch.randn(shape, generator=gen) * 0.02
        else:
            out[key] = torch.randn(shape, generator=gen) * 0.02
    # a wider output layer so sigmoid scores spread over (0, 1)
    out["fc.weight"] = torch.randn(out["fc.weight"].shape, generator=gen) * 0.5
    return out
