"""caption: static caption (appearance), then dynamic caption (motion) of each kept instance.

iMOVE 3.1.1 Step-4: the captioner (InternVL2-40B in the paper) is queried twice. First it sees the
category, the first-frame box (drawn on the frame, plus a crop) and writes a static caption; then, given
that static caption, the trajectory (boxes drawn on frames sampled over the motion segment, and as text),
it writes a dynamic caption. Prompts are versioned package data (stages/data/imove_it/).
"""
from __future__ import annotations

from typing import Sequence

from pydantic import Field

from experts.vlm import VlmRequest, VlmSpec
from schemas._base import STATUS_ERROR, STATUS_SKIPPED
from schemas.captions import SCHEMA, Caption
from schemas.track_verdicts import TrackVerdict
from schemas.tracks import Track
from stages.base import Resources, ShardContext, Stage, StageConfig, chat_resources, vlm_expert_name
from stages.shared.prompts import load_prompt
from stages.imove_it.visual_prompts import boxed_frames, crop, draw_box, scale_box


class CaptionConfig(StageConfig):
    # Paper: InternVL2-40B, typically served by vLLM behind an OpenAI-compatible endpoint.
    vlm: VlmSpec = VlmSpec(model_id="OpenGVLab/InternVL2-40B", backend="openai",
                           base_url="http://127.0.0.1:8000/v1", api_key_env=None, max_new_tokens=256)
    static_prompt: str = "static_caption.v1"
    dynamic_prompt: str = "dynamic_caption.v1"
    num_frames: int = Field(8, ge=2, le=64)
    frame_short_side: int | None = 448  # frames are resized before prompting (boxes scaled with them)
    crop_margin: float = 0.15
    min_segment_s: float = 0.5  # instances visible for a shorter span have no motion worth captioning
    max_trajectory_lines: int = 16
    # Throughput only (left out of the config hash): instances whose frames are decoded ahead of the VLM on a
    # prefetch thread (None: one model batch, see stages.shared.prefetch.model_batch_size; 0: decode inline).
    prefetch_depth: int | None = Field(None, ge=0)

    RUN_ONLY_FIELDS = frozenset({"prefetch_depth"})


PROFILES = {
    "small": {"vlm": {"model_id": "Qwen/Qwen2-VL-2B-Instruct", "backend": "transformers", "max_new_tokens": 128}},
    "tiny": {"vlm": {"model_id": "tiny://qwen2_vl", "backend": "transformers", "max_new_tokens": 24},
             "num_frames": 4, "frame_short_side": 112, "min_segment_s": 0.2},
}


def motion_segment(track: Track) -> tuple[float, float, list[float], list[float]] | None:
    """(t1, t2, box1, box2): first and last visible tracked frame of the instance."""
    vis = [p for p in track.points if p.get("visible") and p.get("box_xyxy_px") is not None]
    if not vis:
        return None
    return vis[0]["t_s"], vis[-1]["t_s"], list(vis[0]["box_xyxy_px"]), list(vis[-1]["box_xyxy_px"])


def trajectory_text(track: Track, t1: float, t2: float, max_lines: int) -> str:
    vis = [p for p in track.points if p.get("visible") and p.get("box_xyxy_px") is not None and t1 <= p["t_s"] <= t2]
    if len(vis) > max_lines:
        idx = [round(i * (len(vis) - 1) / (max_lines - 1)) for i in range(max_lines)]
        vis = [vis[i] for i in idx]
    return "\n".join(
        f"t={p['t_s'] - track.start_s:.2f}s: [{', '.join(str(round(v)) for v in p['box_xyxy_px'])}]" for p in vis)


def _fmt_box(b: Sequence[float]) -> str:
    return "[" + ", ".join(str(round(v)) for v in b) + "]"


def _frames(track: Track, t1: float, t2: float, cfg: CaptionConfig):
    from experts.video import read_frames

    end = t2 if t2 > t1 else t1 + 1e-3
    return read_frames(track.video_path, start_s=t1, end_s=end + 1e-3, num_frames=cfg.num_frames,
                       short_side=cfg.frame_short_side)


def static_request(track: Track, first, box1: list[float], cfg: CaptionConfig, prompt: str) -> VlmRequest:
    h, w = first.shape[:2]
    sx, sy = w / track.width, h / track.height
    box_s = scale_box(box1, sx, sy)
    text = prompt.format(label=track.label, box=_fmt_box(box1), width=track.width, height=track.height)
    return VlmRequest(text=text, images=(draw_box(first, box_s), crop(first, box_s, cfg.crop_margin)))


def dynamic_request(track: Track, frames, static_caption: str, t1: float, t2: float, cfg: CaptionConfig,
                    prompt: str) -> VlmRequest:
    images = boxed_frames(frames, track.points, track.width, track.height)
    text = prompt.format(num_frames=len(images), t1=t1 - track.start_s, t2=t2 - track.start_s,
                         static_caption=static_caption.strip(), width=track.width, height=track.height,
                         trajectory=trajectory_text(track, t1, t2, cfg.max_trajectory_lines))
    return VlmRequest(text=text, images=images)


def process(ctx: ShardContext) -> list[Caption]:
    from experts.vlm import load_vlm

    cfg: CaptionConfig = ctx.config
    kept = {v.instance_id for v in ctx.read_records("trackfilter", TrackVerdict) if v.kept}
    tracks = [t for t in ctx.read_records("track", Track) if t.instance_id in kept]
    if not tracks:
        return []
    vlm = ctx.chat_expert("caption.vlm", cfg.vlm, load_vlm)
    return caption_tracks(tracks, vlm, cfg, progress=ctx.progress)


def caption_tracks(tracks: Sequence[Track], vlm, cfg: CaptionConfig, progress=lambda done, total: None) -> list[Caption]:
    """One caption row per track, in the order of ``tracks``.

    Instances go to the VLM a model batch at a time (static captions of the batch in one ``generate`` call,
    then their dynamic captions in another); the frames of the next batch are decoded on a prefetch thread
    while the VLM works on this one. A motion segment whose frames cannot be read is that instance's error row.
    """
    from stages.shared.prefetch import model_batch_size, prefetched_batches

    p_static = load_prompt("imove_it", cfg.static_prompt)
    p_dynamic = load_prompt("imove_it", cfg.dynamic_prompt)
    version = f"{p_static.version}+{p_dynamic.version}"

    def plan(tr: Track) -> tuple[dict, tuple | None, str | None]:
        """(row fields, (t1, t2, box1, box2) of the segment to caption or None, why it is skipped)."""
        base = dict(instance_id=tr.instance_id, clip_id=tr.clip_id, video_id=tr.video_id, video_path=tr.video_path,
                    label=tr.label, clip_start_s=tr.start_s, clip_end_s=tr.end_s, width=tr.width or 0,
                    height=tr.height or 0, prompt_version=version)
        seg = motion_segment(tr)
        if seg is None or not tr.width or not tr.height:
            base.update(t1_s=tr.start_s, t2_s=tr.start_s, box1_xyxy_px=list(tr.first_box_xyxy_px),
                        box2_xyxy_px=list(tr.first_box_xyxy_px))
            return base, None, "instance is never visible in its track"
        t1, t2, b1, b2 = seg
        base.update(t1_s=t1, t2_s=t2, box1_xyxy_px=b1, box2_xyxy_px=b2)
        if t2 - t1 < cfg.min_segment_s:
            return base, None, f"visible for {t2 - t1:.2f} s < min_segment_s={cfg.min_segment_s}"
        return base, seg, None

    plans = {tr.instance_id: plan(tr) for tr in tracks}

    def load(tr: Track):
        seg = plans[tr.instance_id][1]
        if seg is None:
            return None  # skipped: nothing to decode
        frames = _frames(tr, seg[0], seg[1], cfg)
        if not frames:
            raise ValueError("no frames decoded in the motion segment")
        return frames

    rows: dict[str, Caption] = {}
    size = model_batch_size(cfg.vlm)
    done = 0
    for batch in prefetched_batches(tracks, load, size, cfg.prefetch_depth):
        todo = []  # (track, t1, t2, box1, frames)
        for tr, frames in batch:
            base, seg, skipped = plans[tr.instance_id]
            if skipped is not None:
                rows[tr.instance_id] = Caption(**base, frame_times_s=[], status=STATUS_SKIPPED, error=skipped)
            elif isinstance(frames, Exception):  # a video that fails to decode is this instance's error row
                rows[tr.instance_id] = Caption(**base, frame_times_s=[], status=STATUS_ERROR,
                                               error=f"could not read frames {seg[0]:.2f}-{seg[1]:.2f}s of "
                                                     f"{tr.video_path}: {frames}")
            else:
                rows[tr.instance_id] = Caption(**base, frame_times_s=[f.t_s for f in frames])
                todo.append((tr, seg[0], seg[1], seg[2], frames))
        # Pass 1: static captions of the batch in one call (the backend bounds concurrency).
        static = vlm.generate([static_request(tr, frames[0].image, b1, cfg, p_static.text)
                               for tr, _, _, b1, frames in todo]) if todo else []
        dyn_todo = []
        for (tr, t1, t2, b1, frames), resp in zip(todo, static):
            if resp.error or not (resp.text or "").strip():
                rows[tr.instance_id] = _replace(rows[tr.instance_id], status=STATUS_ERROR,
                                                error=f"static caption failed: {resp.error or 'empty reply'}")
                continue
            rows[tr.instance_id] = _replace(rows[tr.instance_id], static_caption=resp.text.strip())
            dyn_todo.append((tr, t1, t2, frames, resp.text))
        # Pass 2: dynamic captions conditioned on the static ones.
        dynamic = vlm.generate([dynamic_request(tr, frames, sc, t1, t2, cfg, p_dynamic.text)
                                for tr, t1, t2, frames, sc in dyn_todo]) if dyn_todo else []
        for (tr, *_), resp in zip(dyn_todo, dynamic):
            if resp.error or not (resp.text or "").strip():
                rows[tr.instance_id] = _replace(rows[tr.instance_id], status=STATUS_ERROR,
                                                error=f"dynamic caption failed: {resp.error or 'empty reply'}")
            else:
                rows[tr.instance_id] = _replace(rows[tr.instance_id], dynamic_caption=resp.text.strip())
        done += len(batch)
        progress(done, len(tracks))
    return [rows[t.instance_id] for t in tracks]


def _replace(row: Caption, **kw) -> Caption:
    import dataclasses

    return dataclasses.replace(row, **kw)



STAGE = Stage(
    name="caption", schema=SCHEMA, inputs=("track", "trackfilter"), config_cls=CaptionConfig, process=process,
    expert=vlm_expert_name, resources=Resources(cpus=2, gpus=1), branch="imove_it",
    resources_fn=lambda cfg: chat_resources(Resources(cpus=2, gpus=1), cfg.vlm),
    description="VLM static then dynamic caption of each kept instance (iMOVE 3.1.1 Step-4)",
)
