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


def event_compressed_inputs(model: Any, compressor: EventAwareCompression, batch: dict, video_token_id: int,
                            pad_token_id: int, padding_side: str = "left") -> dict:
    """Processor batch (videos, uncompressed) -> ``inputs_embeds``, ``attention_mask``, ``position_ids``
    (and ``labels`` if given) for ``model(**out)``. Gradients flow through the tower into the kept tokens."""
    inner = model.model
    tower = inner.visual
    merge = tower.spatial_merge_size
    grids = batch["video_grid_thw"]
    vision = tower(batch["pixel_values_videos"].to(tower.dtype), grid_thw=grids).pooler_output
    per_video = torch.split(vision, (grids.prod(-1) // merge**2).tolist())
    videos = []
    for tokens, (t, h, w) in zip(per_video, grids.tolist()):
        videos.append(compressor(tokens.view(t, h // merge, w // merge, -1)))
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
                pos[0, i:i + n] = cur + v.frame_index.cpu()
                pos[1, i:i + n] = cur + v.grid_position[:, 0].cpu()
                pos[2, i:i + n] = cur + v.grid_position[:, 1].cpu()
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
