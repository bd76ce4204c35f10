"""The papers' model parts as torch modules that plug into a transformers VLM by config.

* :mod:`.event_compression`: iMOVE 3.2.1 event-aware spatiotemporal efficient modeling.
* :mod:`.position_tokens`: iMOVE 3.2.2 relative spatiotemporal position tokens (numbers or added tokens).
* :mod:`.temporal_fusion`: MotionBench section 4 TE Fusion and the compression baselines it is compared with.

:func:`apply_model_parts` is the one entry point a training flow calls after loading the model and before
wrapping it (peft / accelerate).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from experts.model_parts.config import (EventCompressionConfig, ModelPartsConfig, PositionTokensConfig,
                                        TemporalFusionConfig)
from experts.model_parts.event_compression import (EventAwareCompression, compress_events, event_token_count,
                                                   segment_events)
from experts.model_parts.position_tokens import (RelativeTokenCodec, add_position_tokens, from_model_text,
                                                 to_model_text, tokenizer_of)
from experts.model_parts.temporal_fusion import TemporalFusionTower, compress_video_placeholders, shrink_video_runs

__all__ = [
    "AppliedModelParts", "EventAwareCompression", "EventCompressionConfig", "ModelPartsConfig",
    "PositionTokensConfig", "TemporalFusionConfig", "TemporalFusionTower", "apply_model_parts",
    "compress_events", "compress_video_placeholders", "event_token_count", "segment_events", "MODEL_ATTR",
    "attach_parts", "attached_parts",
]

# the attribute of a model that carries its AppliedModelParts, so whoever batches for it (the training
# collator, the VLM expert's generation) rewrites its inputs and texts the same way
MODEL_ATTR = "motionforge_parts"


@dataclass
class AppliedModelParts:
    """What :func:`apply_model_parts` changed, and the batch / text adapters that go with it."""

    config: ModelPartsConfig
    tokenizer: Any
    codec: RelativeTokenCodec | None = None
    new_token_ids: tuple[int, ...] = ()
    fusion_tower: TemporalFusionTower | None = None
    event_compression: EventAwareCompression | None = None
    # parameters the parts added (fusion projections, inflated patch embedding, slot embeddings): train them
    # in full (peft: modules_to_save / an extra param group), whatever is done to the checkpoint's weights
    new_parameters: dict[str, nn.Parameter] = field(default_factory=dict)
    # the vision tower's spatial merge and frames per time slot (Qwen2-VL: 2 and 2)
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2

    def prepare_video(self, frames: Any) -> Any:
        """Sampled frames (T, H, W, 3) -> the frames the processor gets: with event compression and
        ``frame_per_slot``, each frame repeated to fill one tower time slot (so each frame is one event unit)."""
        ev = self.config.event_compression
        if self.event_compression is None or not ev.frame_per_slot or self.temporal_patch_size == 1:
            return frames
        import numpy as np

        return np.repeat(np.asarray(frames), self.temporal_patch_size, axis=0)

    def event_token_counts(self, video_grid_thw: Any) -> list[int]:
        """Decoder tokens of each video (processor grid, one row per video) after event-aware compression."""
        m = self.spatial_merge_size
        return [self.event_compression.token_count(int(t), (int(h) // m, int(w) // m))
                for t, h, w in video_grid_thw.tolist()]

    def prepare_batch(self, batch: dict, video_token_id: int) -> dict:
        """Processor batch -> what the changed model expects: video placeholders shrunk by the fusion rate, or
        to the event-compressed count (grid and pixels stay the processor's: the model compresses them)."""
        tf = self.config.temporal_fusion
        if self.event_compression is not None and "video_grid_thw" in batch:
            counts = self.event_token_counts(batch["video_grid_thw"])
            m2 = self.spatial_merge_size ** 2
            full = [int(t * h * w) // m2 for t, h, w in batch["video_grid_thw"].tolist()]

            def shrink(video: int, run: int) -> int:
                if run != full[video]:
                    raise ValueError(f"video {video}: {run} placeholders for a grid of {full[video]} tokens "
                                     "(was the batch already rewritten?)")
                return counts[video]

            tok = self.tokenizer
            return shrink_video_runs(batch, shrink, video_token_id, tok.pad_token_id,
                                     getattr(tok, "padding_side", "left"))
        if tf.rate == 1:
            return dict(batch)
        tok = self.tokenizer
        return compress_video_placeholders(batch, tf.rate, video_token_id, tok.pad_token_id,
                                           getattr(tok, "padding_side", "left"))

    def event_inputs(self, model: Any, batch: dict, video_token_id: int) -> dict:
        """Processor batch -> ``inputs_embeds`` / ``position_ids`` with every video event-compressed
        (Qwen2-VL; see :mod:`.event_vlm`)."""
        if self.event_compression is None:
            raise ValueError("event_compression is not enabled in this ModelPartsConfig")
        from experts.model_parts.event_vlm import event_compressed_inputs

        tok = self.tokenizer
        return event_compressed_inputs(model, self.event_compression, batch, video_token_id, tok.pad_token_id,
                                       getattr(tok, "padding_side", "left"))

    def to_model_text(self, text: str) -> str:
        return to_model_text(text, self.codec, self.config.position_tokens)

    def from_model_text(self, text: str) -> str:
        return from_model_text(text, self.codec, self.config.position_tokens)


def _vision_owner(model: Any) -> Any:
    """The module that holds ``visual`` (``Qwen2VLForConditionalGeneration.model`` or the model itself)."""
    for owner in (getattr(model, "model", None), model):
        if owner is not None and isinstance(getattr(owner, "visual", None), nn.Module):
            return owner
    raise TypeError(f"{type(model).__name__} has no Qwen2-VL style `visual` tower to fuse frames in")


def apply_model_parts(model: Any, processor_or_tokenizer: Any, cfg: ModelPartsConfig,
                      codec: RelativeTokenCodec | None = None) -> AppliedModelParts:
    """Change ``model`` (and its tokenizer) in place as ``cfg`` says; returns what changed.

    ``codec`` is the export's relative-token codec (pass the module ``stages.shared.relative_tokens``); it is
    needed for ``position_tokens.mode = "tokens"``."""
    tok = tokenizer_of(processor_or_tokenizer)
    applied = AppliedModelParts(config=cfg, tokenizer=tok, codec=codec)
    if cfg.position_tokens.mode == "tokens":
        if codec is None:
            raise ValueError("position_tokens.mode='tokens' needs codec=stages.shared.relative_tokens")
        applied.new_token_ids = add_position_tokens(model, processor_or_tokenizer, codec, cfg.position_tokens)
    tf = cfg.temporal_fusion
    if tf.rate > 1:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

        from experts.model_parts.temporal_fusion import INSIDE_ENCODER

        owner = _vision_owner(model)
        tower = owner.visual
        qwen25 = isinstance(tower, Qwen2_5_VisionTransformerPretrainedModel)
        if not (isinstance(tower, Qwen2VisionTransformerPretrainedModel) or qwen25):
            raise TypeError(f"temporal fusion is implemented for the Qwen2-VL / Qwen2.5-VL vision towers; "
                            f"{type(tower).__name__} differs")
        if qwen25 and tf.method in INSIDE_ENCODER:
            raise TypeError(
                f"temporal fusion {tf.method!r} runs inside the encoder and is written for the Qwen2-VL vision tower; "
                "Qwen2.5-VL's tower reorders patches into 112 px windows and attends within them in most blocks "
                "(full attention in a few), so grouped slots, the inflated patch kernel and the pre-merger fusion "
                "would need that window layout rebuilt per group. Its post-encoder methods (none, qformer, "
                "post_pool, post_mlp) work")
        wrapper = TemporalFusionTower(tower, tf)
        owner.visual = wrapper
        applied.fusion_tower = wrapper
        applied.new_parameters = {n: p for n, p in wrapper.named_parameters() if not n.startswith("tower.")}
    if cfg.event_compression.enabled:
        from experts.model_parts.event_vlm import enable_event_compression

        applied.event_compression = EventAwareCompression(cfg.event_compression.num_events,
                                                          cfg.event_compression.stride)
        enable_event_compression(model, applied.event_compression)
    vision_cfg = getattr(getattr(model, "config", None), "vision_config", None)
    if vision_cfg is not None:
        applied.spatial_merge_size = int(getattr(vision_cfg, "spatial_merge_size", 2))
        applied.temporal_patch_size = int(getattr(vision_cfg, "temporal_patch_size", 2))
    return applied


def attach_parts(model: Any, applied: AppliedModelParts) -> None:
    """Record ``applied`` on ``model`` (a plain attribute: not a submodule, not in the state dict)."""
    object.__setattr__(model, MODEL_ATTR, applied)


def attached_parts(model: Any) -> AppliedModelParts | None:
    """The parts recorded on ``model`` (peft wrappers forward the attribute to the base model), or None."""
    found = getattr(model, MODEL_ATTR, None)
    return found if isinstance(found, AppliedModelParts) else None
