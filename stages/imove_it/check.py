"""check: a second VLM judges each dynamic caption (iMOVE 3.1.1 Step-4, the checker).

The checker (Qwen2-VL-7B-Instruct in the paper) sees frames of the motion segment with the instance boxed
and the dynamic caption, and answers whether the caption is correct and whether it refers to this
instance only. Captions failing either are rejected with the judge's reason.
"""
from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import Field

from experts.structured import one_line_text_pattern
from experts.vlm import VlmRequest, VlmSpec
from schemas._base import STATUS_ERROR, STATUS_SKIPPED
from schemas.caption_verdicts import SCHEMA, CaptionVerdict
from schemas.captions import Caption
from schemas.tracks import Track
from stages.base import Resources, ShardContext, Stage, StageConfig, chat_resources, vlm_expert_name
from stages.shared.prefetch import model_batch_size, prefetched_batches
from stages.shared.prompts import load_prompt
from stages.imove_it.visual_prompts import boxed_frames


class CheckConfig(StageConfig):
    vlm: VlmSpec = VlmSpec(model_id="Qwen/Qwen2-VL-7B-Instruct", backend="openai",
                           base_url="http://127.0.0.1:8001/v1", api_key_env=None, max_new_tokens=96)
    prompt: str = "check.v1"
    num_frames: int = Field(8, ge=1, le=64)
    frame_short_side: int | None = 448
    # What to do with a reply that states no verdict. "error" keeps it as an error row (default); the tiny
    # profile accepts so that data reaches the tasks stage with random-weight models.
    unparseable: Literal["error", "reject", "accept"] = "error"
    # Decode the reply under VERDICT_SCHEMA when the backend can enforce it (in-process, or an endpoint with
    # supports_json_schema). The tiny profile turns it off: a random model would then state a verdict, mostly
    # "no", and reject every caption; unconstrained, its replies state none and unparseable=accept lets the
    # data through to the tasks stage as before.
    constrained_decoding: bool = True


PROFILES = {
    "small": {"vlm": {"model_id": "Qwen/Qwen2-VL-2B-Instruct", "backend": "transformers"}},
    "tiny": {"vlm": {"model_id": "tiny://qwen2_vl", "backend": "transformers", "max_new_tokens": 24},
             "num_frames": 4, "frame_short_side": 112, "unparseable": "accept", "constrained_decoding": False},
}

# The reply shape the prompt asks for; decoded against when the backend can enforce it (ChatSpec.enforces_json_schema).
VERDICT_SCHEMA: dict = {
    "title": "CheckVerdict", "type": "object",
    "properties": {"correct": {"type": "string", "enum": ["yes", "no"]},
                   "unique": {"type": "string", "enum": ["yes", "no"]},
                   # a pattern also keeps raw control characters out of the decoded string
                   "reason": {"type": "string", "pattern": one_line_text_pattern(160)}},
    "required": ["correct", "unique", "reason"], "additionalProperties": False,
}

_YES = {"yes", "true", "y", "correct", "1"}
_NO = {"no", "false", "n", "incorrect", "0"}


def _yn(v) -> bool | None:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower().strip(".\"' ")
    return True if s in _YES else False if s in _NO else None


def parse_verdict(text: str) -> tuple[bool | None, bool | None, str | None]:
    """(correct, unique, reason) from a JSON reply, or from 'correct: yes' style lines as a fallback."""
    m = re.search(r"\{.*\}", text or "", re.S)
    if m:
        try:
            d = json.loads(m.group(0), strict=False)
            if isinstance(d, dict):
                return _yn(d.get("correct")), _yn(d.get("unique")), (str(d["reason"]) if d.get("reason") else None)
        except json.JSONDecodeError:
            pass
    def field(name):  # also reads a JSON reply cut short by max_new_tokens: "correct": "yes", ...
        mm = re.search(rf"{name}\W{{0,3}}\s*\"?(yes|no|true|false)\b", text or "", re.I)
        return _yn(mm.group(1)) if mm else None
    rm = re.search(r"reason\W{0,3}\s*(.+)", text or "", re.I)
    return field("correct"), field("unique"), (rm.group(1).strip().strip('"}') if rm else None)


def verdict_row(cap: Caption, reply: str, cfg: CheckConfig, version: str) -> CaptionVerdict:
    correct, unique, reason = parse_verdict(reply)
    base = dict(instance_id=cap.instance_id, clip_id=cap.clip_id, prompt_version=version, raw_reply=reply,
                correct=correct, unique=unique)
    if correct is None or unique is None:
        msg = f"checker reply states no verdict: {reply[:160]!r}"
        if cfg.unparseable == "accept":
            return CaptionVerdict(**base, accepted=True, reason=f"{msg}; accepted by unparseable=accept")
        if cfg.unparseable == "reject":
            return CaptionVerdict(**base, accepted=False, reason=msg, status=STATUS_SKIPPED, error=msg)
        return CaptionVerdict(**base, accepted=False, reason=msg, status=STATUS_ERROR, error=msg)
    if correct and unique:
        return CaptionVerdict(**base, accepted=True, reason=reason)
    why = ", ".join(w for w, ok in (("incorrect", correct), ("not unique to the instance", unique)) if not ok)
    msg = f"checker rejected the caption ({why})" + (f": {reason}" if reason else "")
    return CaptionVerdict(**base, accepted=False, reason=msg, status=STATUS_SKIPPED, error=msg)


def check_request(cap: Caption, track: Track | None, frames, prompt: str, structured: bool = False) -> VlmRequest:
    images = boxed_frames(frames, track.points if track else None, cap.width, cap.height)
    text = prompt.format(t1=cap.t1_s - cap.clip_start_s, t2=cap.t2_s - cap.clip_start_s, label=cap.label,
                         dynamic_caption=(cap.dynamic_caption or "").replace('"', "'"))
    return VlmRequest(text=text, images=images, json_schema=VERDICT_SCHEMA if structured else None)


def process(ctx: ShardContext) -> list[CaptionVerdict]:
    from experts.video import read_frames
    from experts.vlm import load_vlm

    cfg: CheckConfig = ctx.config
    caps = [c for c in ctx.read_records("caption", Caption) if c.dynamic_caption]
    if not caps:
        return []
    tracks = {t.instance_id: t for t in ctx.read_records("track", Track)}
    prompt = load_prompt("imove_it", cfg.prompt)
    vlm = ctx.chat_expert("check.vlm", cfg.vlm, load_vlm)
    rows: dict[str, CaptionVerdict] = {}

    def load(cap: Caption):
        return read_frames(cap.video_path, start_s=cap.t1_s, end_s=max(cap.t2_s, cap.t1_s + 1e-3) + 1e-3,
                           num_frames=cfg.num_frames, short_side=cfg.frame_short_side)

    # frames of the next batch are decoded on a prefetch thread while the checker works on this one
    size = model_batch_size(cfg.vlm)
    for batch in prefetched_batches(caps, load, size):
        reqs, order = [], []
        for cap, frames in batch:
            if isinstance(frames, Exception):
                rows[cap.instance_id] = CaptionVerdict(instance_id=cap.instance_id, clip_id=cap.clip_id, accepted=False,
                                                       prompt_version=prompt.version, status=STATUS_ERROR,
                                                       error=f"could not read frames of {cap.video_path}: {frames}")
                continue
            reqs.append(check_request(cap, tracks.get(cap.instance_id), frames, prompt.text,
                                      cfg.constrained_decoding and cfg.vlm.enforces_json_schema))
            order.append(cap)
        for cap, resp in zip(order, vlm.generate(reqs) if reqs else []):
            if resp.error:
                rows[cap.instance_id] = CaptionVerdict(instance_id=cap.instance_id, clip_id=cap.clip_id, accepted=False,
                                                       prompt_version=prompt.version, status=STATUS_ERROR,
                                                       error=f"checker call failed: {resp.error}")
            else:
                rows[cap.instance_id] = verdict_row(cap, resp.text or "", cfg, prompt.version)
    return [rows[c.instance_id] for c in caps]



STAGE = Stage(
    name="check", schema=SCHEMA, inputs=("caption", "track"), config_cls=CheckConfig, process=process,
    expert=vlm_expert_name, resources=Resources(cpus=2, gpus=1), branch="imove_it",
    resources_fn=lambda cfg: chat_resources(Resources(cpus=2, gpus=1), cfg.vlm),
    description="second VLM checks each dynamic caption: correct and unique to the instance",
)
