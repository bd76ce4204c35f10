"""Frozen configs for the papers' model parts; one :class:`ModelPartsConfig` drives :func:`apply_model_parts`."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class EventCompressionConfig(_Frozen):
    """iMOVE 3.2.1 event-aware spatiotemporal efficient modeling. Paper settings (appendix B.1, Table 5 row 3):
    96 frames, 24 events, first frames at 8x8 = 64 tokens, later frames pooled at stride 2 (4x4 = 16)."""

    enabled: bool = False
    num_events: int = Field(24, ge=0)
    stride: int = Field(2, ge=1)
    # iMOVE's unit is a frame; Qwen2-VL's tower packs temporal_patch_size (2) frames into one time slot. True:
    # every sampled frame is repeated to fill its own slot (as Qwen2-VL does with an image), so N sampled frames
    # are N slots and 96 frames at 224 px cost 2,688 tokens. False: the tower's slots (frame pairs) are the units.
    frame_per_slot: bool = True


class PositionTokensConfig(_Frozen):
    """iMOVE 3.2.2 relative spatiotemporal position tokens (time 0..300, coordinates 0..1000).

    ``numbers``: the paper's choice, plain digits through the existing vocabulary (nothing changes in the
    model). ``tokens``: the "Add-Tokenizer" variant of iMOVE Table 6, one added tokenizer entry per value,
    initialised from ``init``: ``digits`` = mean embedding of the value's digit tokens, ``mean`` = mean of
    all existing embeddings."""

    mode: Literal["numbers", "tokens"] = "numbers"
    init: Literal["digits", "mean"] = "digits"


TemporalMethod = Literal["none", "pre_encoder", "qformer", "post_pool", "kangaroo", "post_mlp", "te_fusion"]

# Names as MotionBench Tables 4 / 7 / 8 print them, in their row order, for our paradigm implementations;
# post_mlp is ours (Kangaroo's fusion moved after the merger), selectable but not in the paper's grid.
METHOD_LABELS: dict[str, str] = {
    "none": "Baseline (no temporal fusion)",
    "pre_encoder": "Qwen2-VL (pre-encoder fusion)",
    "qformer": "QFormer (post-encoder)",
    "post_pool": "PLLaVA (post-encoder pooling)",
    "kangaroo": "Kangaroo (post-encoder spatial-temporal patchification)",
    "te_fusion": "TE Fusion (ours in the paper)",
    "post_mlp": "Post-encoder MLP after the merger (not a paper row)",
}
PAPER_METHODS: tuple[str, ...] = ("none", "pre_encoder", "qformer", "post_pool", "kangaroo", "te_fusion")


class TemporalFusionConfig(_Frozen):
    """MotionBench section 4 / appendix 8 video compression paradigms, rate k = encoder time slots per
    output slot (a Qwen2-VL time slot is ``temporal_patch_size`` = 2 frames).

    * ``none``: baseline without temporal fusion: every k-th slot is kept, the others are dropped (the
      paper's baseline sees N_input / k frames).
    * ``pre_encoder``: Qwen2-VL style; k neighbouring slots concatenated along the channel axis before the
      patch embedding (temporal kernel k x temporal_patch_size, inflated from the checkpoint's kernel).
    * ``qformer``: post-encoder QFormer (MotionBench appendix 8, item 4); every slot encoded alone and merged,
      then each group of k slots' tokens is one key/value sequence for a small Q-Former learned from scratch
      whose learned queries give one slot's worth of tokens (``qformer_layers`` blocks, ``qformer_query_grid``
      x ``qformer_query_grid`` learned queries, resized to the slot's grid).
    * ``post_pool``: PLLaVA style; every slot encoded alone, then k slots average-pooled after the merger.
    * ``kangaroo``: Kangaroo's unified spatial-temporal patchification as the appendix re-implements it (item
      3 and the pseudo-code's ``temporal_downsample_with_MLP`` before ``spatial_downsample_with_proj``): every
      slot encoded alone, the k slots' per-patch encoder states concatenated along the hidden size and
      projected back by a learned linear layer, *before* the tower's merger.
    * ``post_mlp``: not a paper row; like ``kangaroo`` but the k slots are concatenated *after* the merger.
    * ``te_fusion``: Through-Encoder Fusion (appendix 8 item 1 and its pseudo-code); k slots attend to each
      other in every encoder block (group self-attention, with a learned per-slot temporal embedding so the
      group knows frame order), then the same fusion as ``kangaroo``: the k slots' per-patch encoder states
      concatenated along the hidden size and projected back (``concat_neighbor_hidden``), *then* the tower's
      merger (``downsample_with_proj``). It differs from ``kangaroo`` only in the joint encoding.
    """

    method: TemporalMethod = "none"
    rate: int = Field(1, ge=1)
    # qformer only: blocks (self-attention, cross-attention to the group, MLP) and the side of the learned query
    # grid (8: one slot of 224 px frames is 8 x 8 merged tokens in Qwen2-VL)
    qformer_layers: int = Field(2, ge=1)
    qformer_query_grid: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _check(self) -> "TemporalFusionConfig":
        if self.method != "none" and self.rate < 2:
            raise ValueError(f"temporal fusion method {self.method!r} needs a rate k >= 2, got {self.rate}")
        return self


class ModelPartsConfig(_Frozen):
    event_compression: EventCompressionConfig = EventCompressionConfig()
    position_tokens: PositionTokensConfig = PositionTokensConfig()
    temporal_fusion: TemporalFusionConfig = TemporalFusionConfig()

    @model_validator(mode="after")
    def _check(self) -> "ModelPartsConfig":
        if self.event_compression.enabled and self.temporal_fusion.method != "none":
            raise ValueError(
                "event-aware compression (iMOVE) and temporal fusion (MotionBench) are alternative compressions "
                "of the same frames; enable one of them"
            )
        return self
