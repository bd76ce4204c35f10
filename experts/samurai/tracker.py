"""Multi-object, streaming SAMURAI tracker on the official ``sam2`` package.

Construction is the package's own Hydra build (``build_sam2_video_predictor``); loading resolves a
checkpoint (local file/dir, Hugging Face id, or ``tiny://sam2``); inference (:class:`TrackSession`)
composes the model's parts frame by frame:

* the image encoder runs once per frame, shared by all objects;
* memory conditioning, mask decoding and memory encoding run batched over objects;
* every object keeps its own bounded memory (prompt frame, ``num_maskmem - 1`` recent frames chosen by
  SAMURAI's gate, the last ``max_obj_ptrs_in_encoder - 1`` object pointers) and its own Kalman state,
  so memory does not grow with clip length and frames are consumed one at a time.

In SAMURAI mode the decisions are the release's (``motion.py``): the prompt frame decodes one mask from
its box and does not touch the filter; the filter starts on the next frame; candidate boxes use the
inclusive max pixel index; objects count as present above an object-score logit of -1; the first tracked
frame is never a memory candidate.

``SAM2VideoPredictor`` keeps every frame and every frame's output for interactive editing; a dataset
builder only needs forward tracking from first-frame boxes, which is what this module does.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from pydantic import field_validator

from experts.base import (
    ModelSpec,
    WeightsNotFoundError,
    missing_weights_message,
    register_tiny,
    resolve_device,
    resolve_dtype,
    resolve_local,
)
from experts.samurai.kalman import KalmanBoxFilter
from experts.samurai.motion import (
    MotionConfig,
    MotionGate,
    MotionState,
    admit_to_memory,
    select_candidate,
    select_memory,
)

MANIFEST = "sam2_checkpoint.json"

# Hydra overrides for the miniature used by the ``tiny`` profile (ENVIRONMENT.md): 256 px input,
# Hiera stages [1,1,2,1], one memory-attention layer; RoPE tables must match the 16x16 feature map.
TINY_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
TINY_OVERRIDES = (
    "++model.image_size=256",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]",
)

IMG_MEAN = (0.485, 0.456, 0.406)
IMG_STD = (0.229, 0.224, 0.225)


class SamuraiSpec(ModelSpec):
    """What to load and how to track.

    ``model_id``: a SAM 2 / 2.1 Hugging Face id (``facebook/sam2.1-hiera-large``, ``-base-plus``,
    ``-small``, ``-tiny``), a local ``.pt`` checkpoint, a directory holding one (optionally with a
    ``sam2_checkpoint.json`` manifest), or ``tiny://sam2``. ``config`` is the sam2 package's Hydra
    config name (``configs/sam2.1/sam2.1_hiera_l.yaml``); it is inferred for the official ids and
    checkpoint file names.
    """

    config: str | None = None
    hydra_overrides: tuple[str, ...] = ()
    # SAMURAI's thresholds: defaults come from MotionConfig, the one place they are written down.
    samurai_mode: bool = MotionConfig.samurai_mode
    stable_frames_threshold: int = MotionConfig.stable_frames_threshold
    stable_ious_threshold: float = MotionConfig.stable_ious_threshold
    kf_score_weight: float = MotionConfig.kf_score_weight
    min_obj_score_logits: float = MotionConfig.min_obj_score_logits
    memory_bank_iou_threshold: float = MotionConfig.memory_bank_iou_threshold
    memory_bank_obj_score_threshold: float = MotionConfig.memory_bank_obj_score_threshold
    memory_bank_kf_score_threshold: float = MotionConfig.memory_bank_kf_score_threshold
    # Variations of ours, off by default (see MotionConfig for why they exist).
    motion_gate: MotionGate = MotionConfig.motion_gate
    skip_empty_measurements: bool = MotionConfig.skip_empty_measurements
    fps: float | None = None
    offload_state_to_cpu: bool = False

    @field_validator("fps")
    @classmethod
    def _positive_fps(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError(f"fps must be positive or None, got {v}")
        return v

    def motion_config(self) -> MotionConfig:
        return MotionConfig(
            samurai_mode=self.samurai_mode,
            stable_frames_threshold=self.stable_frames_threshold,
            stable_ious_threshold=self.stable_ious_threshold,
            kf_score_weight=self.kf_score_weight,
            min_obj_score_logits=self.min_obj_score_logits,
            memory_bank_iou_threshold=self.memory_bank_iou_threshold,
            memory_bank_obj_score_threshold=self.memory_bank_obj_score_threshold,
            memory_bank_kf_score_threshold=self.memory_bank_kf_score_threshold,
            motion_gate=self.motion_gate,
            skip_empty_measurements=self.skip_empty_measurements,
        )


@dataclass(frozen=True)
class TrackPoint:
    """One object on one processed frame. Boxes are in input-frame pixels, from the mask's extent."""

    instance_id: str
    frame_index: int              # position in the input frame sequence
    t_s: float | None             # from timestamps_s, else frame_index / spec.fps, else None
    box_xyxy_px: tuple[float, float, float, float] | None  # None when the mask is empty
    mask_area_px: int
    object_score: float           # SAM 2 object-score logit (present above -1 in SAMURAI mode, 0 in plain mode)
    kf_score: float | None        # IoU(mask box, Kalman prediction); None outside the motion-aware phase
    visible: bool                 # the mask is non-empty and the object present
    mask_rle: dict | None = None  # COCO uncompressed RLE {"size": [H, W], "counts": [...]}


# ----------------------------------------------------------------------------------------------
# small helpers


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a 2-D bool mask: column-major runs, starting with a (maybe empty) 0-run."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    flat = m.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": [int(h), int(w)], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    vals = np.zeros(h * w, dtype=bool)
    pos, val = 0, False
    for c in rle["counts"]:
        vals[pos:pos + c] = val
        pos += c
        val = not val
    return vals.reshape((w, h)).T


def masks_to_boxes(masks, inclusive: bool = False):
    """``[..., H, W]`` bool tensor -> ``[..., 4]`` float xyxy, zeros for empty masks. The max corner is
    exclusive (pixel edges, what outputs report) or, with ``inclusive``, the last mask pixel's index (what
    SAMURAI's release feeds its Kalman filter)."""
    import torch

    end = 0 if inclusive else 1
    h, w = masks.shape[-2:]
    rows = masks.any(dim=-1)
    cols = masks.any(dim=-2)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ar_h, h).amin(dim=-1)
    y2 = torch.where(rows, ar_h, -1).amax(dim=-1) + end
    x1 = torch.where(cols, ar_w, w).amin(dim=-1)
    x2 = torch.where(cols, ar_w, -1).amax(dim=-1) + end
    boxes = torch.stack([x1, y1, x2, y2], dim=-1).float()
    return torch.where(rows.any(dim=-1, keepdim=True), boxes, torch.zeros_like(boxes))


# ----------------------------------------------------------------------------------------------
# construction / loading


def _ckpt_name_to_config() -> dict[str, str]:
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    return {fname: cfg for cfg, fname in HF_MODEL_ID_TO_FILENAMES.values()}


def resolve_sam2_checkpoint(spec: SamuraiSpec) -> tuple[str, str, tuple[str, ...]]:
    """``(config name, checkpoint path, hydra overrides)`` for ``spec``, without any download attempt
    beyond the Hugging Face cache/hub that ``hf_hub_download`` itself allows."""
    src = resolve_local(spec.model_id, spec.revision)
    p = Path(src)
    overrides = tuple(spec.hydra_overrides)
    if p.is_dir():
        manifest = p / MANIFEST
        if manifest.exists():
            info = json.loads(manifest.read_text())
            return (spec.config or info["config"], str(p / info["checkpoint"]),
                    tuple(info.get("overrides", ())) + overrides)
        pts = sorted(p.glob("*.pt"))
        if len(pts) != 1:
            raise WeightsNotFoundError(
                f"{p} holds {len(pts)} .pt files; expected exactly one SAM 2 checkpoint "
                f"(or a {MANIFEST} manifest); pass the checkpoint file itself as model_id")
        p = pts[0]
    if p.is_file():
        cfg = spec.config or _ckpt_name_to_config().get(p.name)
        if cfg is None:
            raise ValueError(
                f"cannot infer the sam2 config for checkpoint {p.name}; set SamuraiSpec.config, "
                f"e.g. 'configs/sam2.1/sam2.1_hiera_l.yaml'")
        return cfg, str(p), overrides
    from sam2.build_sam import HF_MODEL_ID_TO_FILENAMES

    if spec.model_id not in HF_MODEL_ID_TO_FILENAMES:
        raise WeightsNotFoundError(
            f"{spec.model_id!r} is neither a local checkpoint nor a known SAM 2 hub id "
            f"({sorted(HF_MODEL_ID_TO_FILENAMES)}); pass a local .pt path with SamuraiSpec.config, or tiny://sam2")
    cfg, fname = HF_MODEL_ID_TO_FILENAMES[spec.model_id]
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id=spec.model_id, filename=fname, revision=spec.revision)
    except Exception as exc:  # offline, missing cache, gated repo: one clear message
        raise WeightsNotFoundError(missing_weights_message(spec.model_id, spec.revision)
                                   + f" [{type(exc).__name__}]") from exc
    return spec.config or cfg, path, overrides


def build_sam2_model(config: str, overrides: Sequence[str] = (), ckpt_path: str | None = None,
                     device: str = "cpu"):
    """The sam2 package's own video-model build (Hydra config + postprocessing overrides + loading)."""
    from sam2.build_sam import build_sam2_video_predictor

    return build_sam2_video_predictor(config, ckpt_path=ckpt_path, device=device,
                                      hydra_overrides_extra=list(overrides))


@register_tiny("sam2")
def build_tiny_sam2(out_dir: Path) -> None:
    """Random-initialised miniature SAM 2.1 (about 18 M parameters, 256 px) saved as a checkpoint."""
    import torch

    torch.manual_seed(0)
    model = build_sam2_model(TINY_CONFIG, TINY_OVERRIDES, ckpt_path=None, device="cpu")
    torch.save({"model": model.state_dict()}, Path(out_dir) / "sam2_tiny.pt")
    (Path(out_dir) / MANIFEST).write_text(json.dumps(
        {"config": TINY_CONFIG, "overrides": list(TINY_OVERRIDES), "checkpoint": "sam2_tiny.pt"}, indent=1))


def load_tracker(spec: SamuraiSpec) -> "SamuraiTracker":
    """Resolve weights, build the model on the spec's device, and wrap it. Use with ``get_expert``."""
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    config, ckpt, overrides = resolve_sam2_checkpoint(spec)
    model = build_sam2_model(config, overrides, ckpt_path=ckpt, device=str(device))
    return SamuraiTracker(model, spec, device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# inference


class _ObjectMemory:
    """Bounded memory of one object: prompt frame, gated recent frames, last frame, object pointers."""

    def __init__(self, instance_id: str, num_recent: int, num_ptrs: int) -> None:
        self.instance_id = instance_id
        self.cond_feat = None          # [1, Cm, h, w] maskmem of the prompt frame
        self.cond_ptr = None           # [1, C]
        self.cond_index = 0
        self.admitted: deque = deque(maxlen=max(num_recent, 0))   # (frame_idx, maskmem)
        self.last: tuple[int, Any] | None = None
        self.ptrs: deque = deque(maxlen=max(num_ptrs, 0))        # (frame_idx, obj_ptr [1, C])
        self.motion = MotionState()
        self.num_recent = num_recent

    def memory_feats(self) -> list:
        """Memory features to condition on, oldest first."""
        by_idx = dict(self.admitted)
        if self.last is not None:
            by_idx.setdefault(self.last[0], self.last[1])
        order = select_memory([i for i, _ in self.admitted], None if self.last is None else self.last[0],
                              self.num_recent)
        return [by_idx[i] for i in order]

    def tensors(self) -> list:
        out = [self.cond_feat, self.cond_ptr]
        seen = set()
        for _, t in list(self.admitted) + ([self.last] if self.last else []):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
        out += [t for _, t in self.ptrs]
        return [t for t in out if t is not None]


class TrackSession:
    """Streaming state for one clip. ``step(image)`` consumes one frame and returns its TrackPoints."""

    def __init__(self, tracker: "SamuraiTracker", prompts: Sequence[tuple[str, Sequence[float]]],
                 return_masks: bool = False, num_frames: int | None = None) -> None:
        if not prompts:
            raise ValueError("track() needs at least one (instance_id, box_xyxy_px) prompt")
        ids = [str(i) for i, _ in prompts]
        if len(set(ids)) != len(ids):
            raise ValueError(f"instance ids must be unique, got {ids}")
        self.tracker = tracker
        self.model = tracker.model
        self.prompts = [(str(i), tuple(float(v) for v in box)) for i, box in prompts]
        for i, box in self.prompts:
            if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
                raise ValueError(f"prompt box for instance {i!r} must be (x1, y1, x2, y2) px with x2 > x1 and "
                                 f"y2 > y1, got {box}")
        if num_frames is not None and num_frames < 1:
            raise ValueError(f"num_frames must be >= 1 or None, got {num_frames}")
        self.return_masks = return_masks
        # SAM 2 scales object-pointer temporal offsets by min(clip frames, max_obj_ptrs_in_encoder) - 1. A
        # stream's length is unknown, so without num_frames the long-clip value is used; on clips shorter
        # than max_obj_ptrs_in_encoder frames, pass num_frames to match the release exactly.
        m = self.model
        ptr_span = m.max_obj_ptrs_in_encoder if num_frames is None else min(num_frames, m.max_obj_ptrs_in_encoder)
        self.ptr_offset_scale = max(ptr_span - 1, 1)
        self.objects = [_ObjectMemory(i, m.num_maskmem - 1,
                                      (m.max_obj_ptrs_in_encoder - 1) if m.use_obj_ptrs_in_encoder else 0)
                        for i in ids]
        self.frame_count = 0
        self.redone_frames = 0  # frames where SAMURAI's pick differed from SAM's and the tail was rerun
        self.video_hw: tuple[int, int] | None = None
        self.mem_pos = None  # spatial positional encoding of memories: identical for every frame

    # -- state size (for tests / monitoring)
    def state_tensors(self) -> list:
        ts = [t for o in self.objects for t in o.tensors()]
        if self.mem_pos is not None:
            ts.append(self.mem_pos)
        return ts

    def state_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_tensors())

    # -- pieces
    def _store(self, t):
        # a copy, so that one object's slice does not keep the whole batch's tensor alive
        if self.tracker.spec.offload_state_to_cpu:
            return t.to("cpu", non_blocking=True)
        return t.clone()

    def _preprocess(self, image: np.ndarray):
        import torch
        import torch.nn.functional as F

        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"frames must be HxWx3 uint8 RGB arrays, got shape {arr.shape} dtype {arr.dtype}")
        if self.video_hw is None:
            self.video_hw = arr.shape[:2]
        elif arr.shape[:2] != self.video_hw:
            raise ValueError(f"frame {self.frame_count} is {arr.shape[:2]}, earlier frames were {self.video_hw}")
        dev = self.tracker.device
        x = torch.from_numpy(np.ascontiguousarray(arr)).to(dev, non_blocking=True)
        x = x.permute(2, 0, 1)[None].float() / 255.0
        s = self.model.image_size
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.tracker.img_mean) / self.tracker.img_std

    def _image_features(self, img, n: int):
        m = self.model
        backbone_out = m.forward_image(img)
        _, feats, pos, sizes = m._prepare_backbone_features(backbone_out)
        feats = [f.expand(-1, n, -1) for f in feats]
        pos = [p.expand(-1, n, -1) for p in pos]
        high_res = None
        if len(feats) > 1:
            high_res = [f.permute(1, 2, 0).reshape(n, f.size(2), *s) for f, s in zip(feats[:-1], sizes[:-1])]
        return feats, pos, sizes, high_res

    def _condition(self, feats, pos, sizes, objs: list[_ObjectMemory], frame_idx: int):
        """Fuse the current frame with each object's memory (objects share one memory layout)."""
        import torch
        from sam2.modeling.sam2_utils import get_1d_sine_pe

        m = self.model
        dev = feats[-1].device
        b = len(objs)
        c = m.hidden_dim
        h, w = sizes[-1]
        mem, mem_pos = [], []
        spatial_pos = self.mem_pos.to(dev).flatten(2).permute(2, 0, 1).expand(-1, b, -1)
        recent = [o.memory_feats() for o in objs]
        slots = [(0, [o.cond_feat for o in objs])]
        k = len(recent[0])
        for j in range(k):
            # newest memory sits right before the current frame (SAM 2's temporal slot numbering)
            t_pos = m.num_maskmem - (k - j)
            slots.append((t_pos, [r[j] for r in recent]))
        for t_pos, ts in slots:
            f = torch.cat([t.to(dev, non_blocking=True) for t in ts], dim=0)
            mem.append(f.flatten(2).permute(2, 0, 1))
            mem_pos.append(spatial_pos + m.maskmem_tpos_enc[m.num_maskmem - t_pos - 1])
        n_ptr_tokens = 0
        if m.use_obj_ptrs_in_encoder:
            # temporal offsets: prompt frame, then the most recent frames (1 = previous frame)
            offsets = [frame_idx - objs[0].cond_index] + [frame_idx - i for i, _ in reversed(objs[0].ptrs)]
            ptrs = [torch.cat([o.cond_ptr for o in objs], 0).to(dev)]
            for j in range(len(objs[0].ptrs) - 1, -1, -1):
                ptrs.append(torch.cat([o.ptrs[j][1] for o in objs], 0).to(dev))
            ptrs = torch.stack(ptrs, 0)  # [P, B, C]
            if m.add_tpos_enc_to_obj_ptrs:
                tpos_dim = c if m.proj_tpos_enc_in_obj_ptrs else m.mem_dim
                rel = torch.tensor(offsets, device=dev, dtype=torch.float32) / self.ptr_offset_scale
                ptr_pos = m.obj_ptr_tpos_proj(get_1d_sine_pe(rel, dim=tpos_dim))
                ptr_pos = ptr_pos.unsqueeze(1).expand(-1, b, m.mem_dim)
            else:
                ptr_pos = ptrs.new_zeros(len(offsets), b, m.mem_dim)
            if m.mem_dim < c:
                split = c // m.mem_dim
                ptrs = ptrs.reshape(-1, b, split, m.mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
                ptr_pos = ptr_pos.repeat_interleave(split, dim=0)
            mem.append(ptrs)
            mem_pos.append(ptr_pos)
            n_ptr_tokens = ptrs.shape[0]
        memory = torch.cat(mem, 0)
        memory_pos = torch.cat(mem_pos, 0).to(memory.dtype)
        out = m.memory_attention(curr=feats[-1:], curr_pos=pos[-1:], memory=memory,
                                 memory_pos=memory_pos, num_obj_ptr_tokens=n_ptr_tokens)
        return out.permute(1, 2, 0).reshape(b, c, h, w)

    def _no_memory_features(self, feats, pos, sizes):
        m = self.model
        b = feats[-1].size(1)
        h, w = sizes[-1]
        if m.directly_add_no_mem_embed:
            x = feats[-1] + m.no_mem_embed
        else:
            x = m.memory_attention(curr=feats[-1:], curr_pos=pos[-1:],
                                   memory=m.no_mem_embed.expand(1, b, m.mem_dim),
                                   memory_pos=m.no_mem_pos_enc.expand(1, b, m.mem_dim))
        return x.permute(1, 2, 0).reshape(b, m.hidden_dim, h, w)

    def _decode(self, pix_feat, high_res, point_inputs, multimask: bool):
        """All candidate masks: low-res logits [B, M, h, w], predicted IoUs [B, M], tokens, object logits."""
        import torch

        m = self.model
        b = pix_feat.size(0)
        if point_inputs is None:
            coords = torch.zeros(b, 1, 2, device=pix_feat.device)
            labels = -torch.ones(b, 1, dtype=torch.int32, device=pix_feat.device)
        else:
            coords, labels = point_inputs
        sparse, dense = m.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        low, ious, tokens, obj_logits = m.sam_mask_decoder(
            image_embeddings=pix_feat, image_pe=m.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
            multimask_output=multimask, repeat_image=False, high_res_features=high_res)
        if m.pred_obj_scores:
            # an absent object gets an empty mask everywhere, as in SAM 2's own head (SAMURAI: logit > -1)
            from sam2.modeling.sam2_base import NO_OBJ_SCORE

            present = obj_logits[:, :, None, None] > self.tracker.motion.object_present_logit
            low = torch.where(present, low, NO_OBJ_SCORE)
        return low.float(), ious.float(), tokens, obj_logits.float()

    def _object_pointer(self, tokens, choice, obj_logits):
        import torch

        m = self.model
        b = tokens.size(0)
        tok = tokens[torch.arange(b, device=tokens.device), choice] if tokens.size(1) > 1 else tokens[:, 0]
        ptr = m.obj_ptr_proj(tok)
        if m.pred_obj_scores:
            present = (obj_logits > self.tracker.motion.object_present_logit).to(ptr.dtype)
            appear = obj_logits.sigmoid() if m.soft_no_obj_ptr else present
            if m.fixed_no_obj_ptr:
                ptr = appear * ptr
            ptr = ptr + (1 - appear) * m.no_obj_ptr
        return ptr

    def _encode_memory(self, feats, sizes, high_masks, obj_logits, from_prompt: bool):
        feat, pos = self.model._encode_new_memory(
            current_vision_feats=feats, feat_sizes=sizes, pred_masks_high_res=high_masks,
            object_score_logits=obj_logits, is_mask_from_pts=from_prompt)
        if self.mem_pos is None:
            self.mem_pos = self._store(pos[-1][:1].clone())
        return feat

    def candidate_boxes(self, cand_logits):
        """``[N, M, h, w]`` low-res logits -> ``[N, M, 4]`` boxes of the masks at the model resolution, with
        the inclusive max pixel index (the Kalman filter lives in model pixels, like the release's
        high-resolution masks)."""
        import torch.nn.functional as F

        s = self.model.image_size
        high = F.interpolate(cand_logits.float(), size=(s, s), mode="bilinear", align_corners=False)
        return masks_to_boxes(high > 0, inclusive=True)

    def choose_from_boxes(self, boxes: np.ndarray, pred_ious: np.ndarray) -> tuple[list[int], list[float | None]]:
        """Per object, SAMURAI's (or plain SAM 2's) pick among candidates given as numpy boxes/IoUs."""
        tr = self.tracker
        picks, scores = [], []
        for j, o in enumerate(self.objects):
            c = select_candidate(o.motion, tr.kf, boxes[j], pred_ious[j], tr.motion)
            picks.append(c.index)
            scores.append(c.kf_score)
        return picks, scores

    def choose_candidates(self, cand_logits, pred_ious) -> tuple[Any, list[float | None]]:
        """Choose one of ``M`` candidate masks per object: ``[N, M, h, w]`` low-res logits and ``[N, M]``
        predicted IoUs -> (chosen index per object as a tensor, Kalman score per object).

        SAMURAI mode ranks by motion and advances each object's filter; plain SAM 2 takes the argmax of
        the predicted IoU and never leaves the device.
        """
        import torch

        n = cand_logits.size(0)
        if not self.tracker.motion.samurai_mode or cand_logits.size(1) == 1:
            return pred_ious.argmax(dim=1), [None] * n
        both = torch.cat([self.candidate_boxes(cand_logits), pred_ious.float()[..., None]], dim=-1).cpu().numpy()
        picks, scores = self.choose_from_boxes(both[..., :4], both[..., 4])
        return torch.tensor(picks, device=cand_logits.device), scores

    def _finish(self, low, ious, tokens, obj_logits, choice, feats, sizes, from_prompt: bool):
        """Everything that follows the mask choice: pointer, memory, outputs at the input resolution."""
        import torch
        import torch.nn.functional as F

        n = low.size(0)
        s = self.model.image_size
        vh, vw = self.video_hw
        ar = torch.arange(n, device=low.device)
        low_c = low[ar, choice].unsqueeze(1)
        best_iou = ious[ar, choice]
        high_c = F.interpolate(low_c, size=(s, s), mode="bilinear", align_corners=False)
        ptr = self._object_pointer(tokens, choice, obj_logits)
        mem_feat = self._encode_memory(feats, sizes, high_c, obj_logits, from_prompt=from_prompt)
        video_masks = F.interpolate(low_c, size=(vh, vw), mode="bilinear", align_corners=False)[:, 0] > 0
        stats = torch.cat([masks_to_boxes(video_masks), video_masks.flatten(1).sum(1, keepdim=True).float(),
                           obj_logits.reshape(n, 1).float(), best_iou.reshape(n, 1).float()], 1)
        return ptr, mem_feat, video_masks, stats

    # -- one frame
    def step(self, image: np.ndarray, frame_index: int | None = None, t_s: float | None = None) -> list[TrackPoint]:
        import torch

        tr = self.tracker
        m = self.model
        fi = self.frame_count
        frame_index = fi if frame_index is None else frame_index
        n = len(self.objects)
        with torch.inference_mode(), tr.autocast():
            img = self._preprocess(image)
            vh, vw = self.video_hw
            feats, pos, sizes, high_res = self._image_features(img, n)
            s = m.image_size
            kf_scores: list[float | None] = [None] * n
            if fi == 0:
                boxes = torch.tensor([b for _, b in self.prompts], dtype=torch.float32, device=tr.device)
                coords = boxes.reshape(n, 2, 2) / torch.tensor([vw, vh], device=tr.device) * s
                labels = torch.tensor([[2, 3]] * n, dtype=torch.int32, device=tr.device)
                pix = self._no_memory_features(feats, pos, sizes)
                multimask = m._use_multimask(True, {"point_labels": labels})
                low, ious, tokens, obj_logits = self._decode(pix, high_res, (coords, labels), multimask)
            else:
                pix = torch.empty((n, m.hidden_dim, *sizes[-1]), device=tr.device, dtype=feats[-1].dtype)
                groups: dict[tuple[int, int], list[int]] = {}
                for j, o in enumerate(self.objects):
                    groups.setdefault((len(o.memory_feats()), len(o.ptrs)), []).append(j)
                for idxs in groups.values():
                    sel = torch.tensor(idxs, device=tr.device)
                    pix[sel] = self._condition([f[:, idxs] for f in feats], [p[:, idxs] for p in pos], sizes,
                                               [self.objects[j] for j in idxs], fi).to(pix.dtype)
                multimask = m._use_multimask(False, None)
                low, ious, tokens, obj_logits = self._decode(pix, high_res, None, multimask)
            # SAM 2's own pick first. SAMURAI usually agrees with it, so the rest of the frame is queued
            # speculatively and the candidate boxes come back in the same transfer as the outputs: one
            # device sync per frame, as in plain mode; a disagreement costs a second pass.
            choice = ious.argmax(dim=1)
            ptr, mem_feat, video_masks, stats_t = self._finish(low, ious, tokens, obj_logits, choice, feats, sizes,
                                                               from_prompt=(fi == 0))
            motion_aware = fi > 0 and tr.motion.samurai_mode and low.size(1) > 1
            if motion_aware:
                m_cand = low.size(1)
                packed = torch.cat([stats_t, choice[:, None].float(), self.candidate_boxes(low).reshape(n, -1),
                                    ious.float()], 1).cpu().numpy()
                stats = packed[:, :7]
                cand_boxes = packed[:, 8:8 + 4 * m_cand].reshape(n, m_cand, 4)
                picks, kf_scores = self.choose_from_boxes(cand_boxes, packed[:, 8 + 4 * m_cand:])
                if picks != packed[:, 7].astype(int).tolist():
                    self.redone_frames += 1
                    choice = torch.tensor(picks, device=tr.device)
                    ptr, mem_feat, video_masks, stats_t = self._finish(low, ious, tokens, obj_logits, choice,
                                                                       feats, sizes, from_prompt=False)
                    stats = stats_t.cpu().numpy()
            else:
                stats = stats_t.cpu().numpy()
            masks_np = video_masks.cpu().numpy() if self.return_masks else None

            for j, o in enumerate(self.objects):
                feat_j = self._store(mem_feat[j:j + 1])
                ptr_j = self._store(ptr[j:j + 1])
                if fi == 0:
                    # the prompt frame: one mask from the box, no candidates, so the filter waits (release)
                    o.cond_feat, o.cond_ptr, o.cond_index = feat_j, ptr_j, 0
                    continue
                if admit_to_memory(float(stats[j, 6]), float(stats[j, 5]), kf_scores[j], tr.motion,
                                   frames_after_prompt=fi - o.cond_index):
                    o.admitted.append((fi, feat_j))
                o.last = (fi, feat_j)
                o.ptrs.append((fi, ptr_j))

        self.frame_count += 1
        points = []
        for j, o in enumerate(self.objects):
            area = int(stats[j, 4])
            score = float(stats[j, 5])
            visible = area > 0 and score > tr.motion.object_present_logit
            box = tuple(float(v) for v in stats[j, :4]) if area > 0 else None
            points.append(TrackPoint(
                instance_id=o.instance_id, frame_index=int(frame_index), t_s=t_s, box_xyxy_px=box,
                mask_area_px=area, object_score=score, kf_score=kf_scores[j], visible=visible,
                mask_rle=mask_to_rle(masks_np[j]) if masks_np is not None else None))
        return points


class SamuraiTracker:
    """A loaded SAM 2 model plus the SAMURAI settings; ``track`` runs one clip."""

    def __init__(self, model, spec: SamuraiSpec, device=None, dtype=None) -> None:
        import torch

        self.model = model
        self.spec = spec
        self.device = device if device is not None else next(model.parameters()).device
        self.dtype = dtype if dtype is not None else torch.float32
        self.motion = spec.motion_config()
        self.kf = KalmanBoxFilter()
        self.img_mean = torch.tensor(IMG_MEAN, device=self.device).view(1, 3, 1, 1)
        self.img_std = torch.tensor(IMG_STD, device=self.device).view(1, 3, 1, 1)

    def autocast(self):
        import contextlib

        import torch

        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def session(self, prompts: Sequence[tuple[str, Sequence[float]]], return_masks: bool = False,
                num_frames: int | None = None) -> TrackSession:
        """A streaming session; ``num_frames``: frames it will process, when known (see TrackSession)."""
        return TrackSession(self, prompts, return_masks=return_masks, num_frames=num_frames)

    def track_iter(self, frames: Iterable[Any], prompts: Sequence[tuple[str, Sequence[float]]],
                   timestamps_s: Iterable[float] | None = None,
                   return_masks: bool = False) -> Iterator[list[TrackPoint]]:
        """Yield the TrackPoints of each processed frame, consuming ``frames`` one at a time.

        ``frames``: HxWx3 uint8 RGB arrays, or objects with ``.image`` (and ``.t_s``), such as
        ``experts.video.Frame``. With ``spec.fps`` and known timestamps, frames closer together than
        ``1 / fps`` are skipped; the first frame (the prompt frame) is always processed.
        """
        sess = self.session(prompts, return_masks=return_masks)
        ts_iter = iter(timestamps_s) if timestamps_s is not None else None
        period = None if self.spec.fps is None else 1.0 / self.spec.fps
        next_t: float | None = None
        for idx, item in enumerate(frames):
            image = getattr(item, "image", item)
            if ts_iter is not None:
                try:
                    t = float(next(ts_iter))
                except StopIteration:
                    raise ValueError(f"timestamps_s ran out at frame {idx}; pass one timestamp per frame") from None
            elif getattr(item, "t_s", None) is not None:
                t = float(item.t_s)
            else:
                # no clock: frames are taken as already sampled at spec.fps (e.g. iter_frames(fps=...))
                yield sess.step(image, frame_index=idx, t_s=None if period is None else idx * period)
                continue
            if period is not None:
                if next_t is not None and t < next_t - 1e-6:
                    continue  # closer than 1/fps to the last processed frame
                next_t = t + period if next_t is None else max(next_t + period, t + 1e-9)
            yield sess.step(image, frame_index=idx, t_s=t)

    def track(self, frames: Iterable[Any], prompts: Sequence[tuple[str, Sequence[float]]],
              timestamps_s: Iterable[float] | None = None, return_masks: bool = False) -> list[TrackPoint]:
        """Track every prompted instance from the first frame on; one TrackPoint per instance per processed frame."""
        out: list[TrackPoint] = []
        for pts in self.track_iter(frames, prompts, timestamps_s=timestamps_s, return_masks=return_masks):
            out.extend(pts)
        return out
