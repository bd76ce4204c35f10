"""iMOVE 3.2.1 event-aware compression inside a Qwen2-VL forward pass.

iMOVE runs on InternVL (1-D positions); Qwen2-VL places video tokens with 3-D M-RoPE positions computed
from each video's grid, which no longer describes a sequence whose frames have different sizes. So the
compressed video goes in as ``inputs_embeds`` with explicit ``position_ids``:

* every video is encoded by the (plain) tower, its merged tokens viewed as (slots, h', w', D) and compressed
  (event first slots at full h' x w', the others pooled at stride s);
* the batch's placeholder runs shrink to the compressed counts (content-independent: K and s fix them);
* positions follow Qwen2-VL's rule for vision tokens (time, row, column offset by the text position before
  the video; a pooled token takes its block's top-left cell), and text after a video continues at the
  largest position used so far + 1 (the Qwen2-VL paper's rule).

With 224 x 224 frames a Qwen2-VL slot has 16 x 16 patches = 8 x 8 merged tokens, the paper's 64 per full
frame; 96 slots then cost 2,688 tokens at K = 24, s = 2. (A Qwen2-VL slot is ``temporal_patch_size`` = 2
frames; feed each sampled frame twice to make one slot per frame.)
"""
from __future__ import annotations

from typing import Any

import torch

from experts.model_parts.event_compression import EventAwareCompression
from experts.model_parts.temporal_fusion import shrink_video_runs


def compress_videos(tower: Any, compressor: EventAwareCompression, pixel_values_videos: torch.Tensor,
                    video_grid_thw: torch.Tensor) -> list:
    """Each video's :class:`CompressedVideo`: the plain tower over the processor's pixels, each video's merged
    tokens viewed as (slots, h', w', D), then segmented and compressed."""
    merge = tower.spatial_merge_size
    vision = tower(pixel_values_videos.to(tower.dtype), grid_thw=video_grid_thw).pooler_output
    per_video = torch.split(vision, (video_grid_thw.prod(-1) // merge**2).tolist())
    return [compressor(tokens.view(t, h // merge, w // merge, -1))
            for tokens, (t, h, w) in zip(per_video, video_grid_thw.tolist())]


def video_position_ids(frame_index: torch.Tensor, grid_position: torch.Tensor) -> torch.Tensor:
    """(3, n) M-RoPE positions of a compressed video's kept tokens (its ``frame_index`` and ``grid_position``),
    before the offset of the text in front of it: slot, and row and column of the token's top-left cell."""
    return torch.stack([frame_index.cpu(), grid_position[:, 0].cpu(), grid_position[:, 1].cpu()])


def event_compressed_inputs(model: Any, compressor: EventAwareCompression, batch: dict, video_token_id: int,
                            pad_token_id: int, padding_side: str = "left") -> dict:
    """Processor batch (videos, uncompressed) -> ``inputs_embeds``, ``attention_mask``, ``position_ids``
    (and ``labels`` if given) for ``model(**out)``. Gradients flow through the tower into the kept tokens."""
    inner = model.model
    videos = compress_videos(inner.visual, compressor, batch["pixel_values_videos"], batch["video_grid_thw"])
    out = shrink_video_runs({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")},
                            lambda i, run: videos[i].tokens.shape[0], video_token_id, pad_token_id, padding_side)
    ids, mask = out["input_ids"], out["attention_mask"]
    embeds = inner.get_input_embeddings()(ids)
    video_embeds = torch.cat([v.tokens for v in videos]).to(embeds.dtype)
    embeds = embeds.masked_scatter((ids == video_token_id).unsqueeze(-1), video_embeds)
    position_ids = torch.zeros(3, *ids.shape, dtype=torch.long, device=ids.device)
    video = 0
    for b in range(ids.shape[0]):
        valid = mask[b].bool()
        row = ids[b][valid]
        pos = torch.zeros(3, row.shape[0], dtype=torch.long)
        cur, i = 0, 0
        while i < row.shape[0]:
            if int(row[i]) == video_token_id:
                v = videos[video]
                n = v.tokens.shape[0]
                pos[:, i:i + n] = cur + video_position_ids(v.frame_index, v.grid_position)
                cur = int(pos[:, i:i + n].max()) + 1
                i += n
                video += 1
            else:
                pos[:, i] = cur
                cur += 1
                i += 1
        position_ids[:, b, valid] = pos.to(ids.device)
    out.pop("input_ids")
    out.update(inputs_embeds=embeds, position_ids=position_ids)
    return out


# -- inside the model's own forward (training with Trainer / peft, generate()) ----------------------------------

class _EventCompressedVideos:
    """Mixed into the Qwen2-VL inner model's class by :func:`enable_event_compression`.

    Batch convention (what the collator / ``AppliedModelParts.prepare_batch`` produce): ``video_grid_thw`` and
    ``pixel_values_videos`` are the processor's, uncompressed; each video's run of placeholder tokens (and
    ``mm_token_type_ids``) is already shrunk to the compressed count, which K, s and the grid fix. Then:

    * ``get_video_features`` runs the plain tower and returns each video's event-compressed tokens, which the
      stock forward scatters into the placeholders (so ``inputs_embeds`` are built inside the forward);
    * ``get_rope_index`` gives the compressed tokens their M-RoPE positions (slot, row, column of the token's
      top-left cell; text after a video continues at its largest position + 1) and the ``rope_deltas`` that
      generation continues from. In a forward it reads the event layout the same forward's
      ``get_video_features`` found; ``generate()`` asks for positions before the forward, with the pixels in
      its kwargs, so the layout is computed there (without gradient) and the tokens kept for the prefill.
    """

    motionforge_event_compression: EventAwareCompression

    def _motionforge_events(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor,
                            keep: bool = False) -> list:
        """Each video's :class:`CompressedVideo`; records the layout for ``get_rope_index``. ``keep``: hold the
        result for the next call on the same pixels (generate's positions, then its prefill), used once."""
        key = (pixel_values_videos.data_ptr(), pixel_values_videos._version, tuple(pixel_values_videos.shape),
               tuple(map(tuple, video_grid_thw.tolist())))
        cached = self.__dict__.pop("_motionforge_event_cache", None)
        if cached is not None and cached[0] == key and not torch.is_grad_enabled():
            videos = cached[1]
        else:
            videos = compress_videos(self.visual, self.motionforge_event_compression, pixel_values_videos,
                                     video_grid_thw)
        if keep:
            self.__dict__["_motionforge_event_cache"] = (key, videos)
        self.__dict__["_motionforge_event_layout"] = (key[3], [(v.frame_index, v.grid_position) for v in videos])
        return videos

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor | None = None,
                           **kwargs: Any):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if video_grid_thw is None:
            raise ValueError("event-aware compression needs video_grid_thw with the videos")
        videos = self._motionforge_events(pixel_values_videos, video_grid_thw)
        return BaseModelOutputWithPooling(last_hidden_state=None, pooler_output=tuple(v.tokens for v in videos))

    def get_rope_index(self, input_ids: torch.Tensor, mm_token_type_ids: torch.Tensor,
                       image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                       attention_mask: torch.Tensor | None = None, **kwargs: Any):
        if video_grid_thw is None:
            return super().get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw,
                                          video_grid_thw=None, attention_mask=attention_mask, **kwargs)
        pixels = kwargs.get("pixel_values_videos")
        if pixels is not None:  # generate(): positions are asked for before the forward
            with torch.no_grad():
                self._motionforge_events(pixels, video_grid_thw, keep=True)
        grids, layouts = self.__dict__.get("_motionforge_event_layout") or (None, None)
        if grids != tuple(map(tuple, video_grid_thw.tolist())):
            raise ValueError("event-aware positions need the videos' event layout: pass pixel_values_videos with "
                             "video_grid_thw (precomputed video features are not supported with event compression)")
        merge = self.config.vision_config.spatial_merge_size
        image_grids = iter(image_grid_thw if image_grid_thw is not None else [])
        video_layouts = iter(layouts)
        position_ids = torch.zeros(3, *input_ids.shape, dtype=input_ids.dtype, device=input_ids.device)
        deltas = []
        for b in range(input_ids.shape[0]):
            valid = (attention_mask[b].bool() if attention_mask is not None
                     else torch.ones_like(input_ids[b], dtype=torch.bool))
            types = mm_token_type_ids[b][valid].tolist()
            pieces, cur, i = [], 0, 0
            while i < len(types):
                j = i
                while j < len(types) and types[j] == types[i]:
                    j += 1
                if types[i] == 0:
                    pos = torch.arange(j - i).view(1, -1).expand(3, -1) + cur
                elif types[i] == 1:
                    pos = self.get_vision_position_ids(cur, next(image_grids), 1, merge)
                else:
                    frame_index, grid_position = next(video_layouts)
                    if frame_index.shape[0] != j - i:
                        raise ValueError(
                            f"a video has {j - i} placeholder tokens but {frame_index.shape[0]} event-compressed "
                            "tokens; build the batch with AppliedModelParts.prepare_batch")
                    pos = video_position_ids(frame_index, grid_position) + cur
                pieces.append(pos.to(torch.long))
                cur = int(pos.max()) + 1
                i = j
            row = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
            position_ids[:, b, valid] = row.to(position_ids.device, position_ids.dtype)
            deltas.append(cur - len(types))
        return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


_EVENT_CLASSES: dict[type, type] = {}


def enable_event_compression(model: Any, compressor: EventAwareCompression) -> None:
    """Make ``model`` (a transformers Qwen2-VL ``...ForConditionalGeneration``) event-compress its videos in its
    own forward and in ``generate()``: its inner model's class becomes a subclass with the two methods of
    :class:`_EventCompressedVideos`. Nothing is added to the state dict (the compression has no parameters), so
    checkpoints load into a model built the same way."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    inner = getattr(model, "model", None)
    if type(inner) is not Qwen2VLModel:
        raise TypeError(
            f"event-aware compression is wired for the Qwen2-VL model (Qwen2VLModel), got {type(inner).__name__}: "
            "Qwen2.5-VL times its M-RoPE positions in seconds (second_per_grid_ts) and other families place "
            "video tokens differently; their position rule would need its own get_rope_index")
    cls = _EVENT_CLASSES.setdefault(Qwen2VLModel, type("EventCompressedQwen2VLModel",
                                                       (_EventCompressedVideos, Qwen2VLModel), {}))
    inner.__class__ = cls
    inner.__dict__["motionforge_event_compression"] = compressor
    inner.rope_deltas = None
