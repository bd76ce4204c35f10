"""tasks: the three iMOVE-IT instruction tasks (iMOVE 3.1.2) for every checked instance.

* spatial grounding:   dynamic caption + (t1, t2)        -> box at t1 and box at t2
* temporal grounding:  dynamic caption + (box1, box2)    -> (t1, t2)
* dynamic captioning:  (t1, t2) + (box1, box2)           -> dynamic caption

Times and boxes are written as relative position tokens (3.2.2, :mod:`stages.shared.relative_tokens`),
times relative to the clip. Phrasings come from a versioned template file; the choice per sample is seeded
by (seed, instance_id, task), so a re-run writes the same text.
"""
from __future__ import annotations

import hashlib
import uuid

from schemas._base import STATUS_OK, STATUS_SKIPPED
from schemas.caption_verdicts import CaptionVerdict
from schemas.captions import Caption
from schemas.imove_it import SCHEMA, TASKS, ImoveItSample
from stages.base import ShardContext, Stage, StageConfig
from stages.shared.prompts import load_json_prompt
from stages.shared.relative_tokens import N_SPACE, N_TIME, format_box, format_time, quantize_box, quantize_time

NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "motionforge/imove_it/sample")


class TasksConfig(StageConfig):
    templates: str = "task_templates.v1"
    tasks: tuple[str, ...] = TASKS
    n_time: int = N_TIME
    n_space: int = N_SPACE
    seed: int = 0
    min_interval_tokens: int = 1  # t1 and t2 must be distinguishable once quantised


def _pick(templates: list[dict], seed: int, instance_id: str, task: str) -> dict:
    h = int(hashlib.sha256(f"{seed}:{instance_id}:{task}".encode()).hexdigest()[:8], 16)
    return templates[h % len(templates)]


def _sentence(caption: str) -> str:
    c = caption.strip()
    return c if c.endswith((".", "!", "?")) else c + "."


def build_samples(cap: Caption, cfg: TasksConfig, templates: dict) -> list[ImoveItSample]:
    duration = cap.clip_end_s - cap.clip_start_s
    t1, t2 = cap.t1_s - cap.clip_start_s, cap.t2_s - cap.clip_start_s
    q1, q2 = quantize_time(t1, duration, cfg.n_time), quantize_time(t2, duration, cfg.n_time)
    b1 = quantize_box(cap.box1_xyxy_px, cap.width, cap.height, cfg.n_space)
    b2 = quantize_box(cap.box2_xyxy_px, cap.width, cap.height, cfg.n_space)
    values = dict(t1=format_time(q1), t2=format_time(q2), box1=format_box(b1), box2=format_box(b2),
                  caption=_sentence(cap.dynamic_caption or ""), label=cap.label)
    out = []
    for task in cfg.tasks:
        tpl = _pick(templates[task], cfg.seed, cap.instance_id, task)
        conv = [{"from": "human", "value": tpl["human"].format(**values)},
                {"from": "gpt", "value": tpl["gpt"].format(**values)}]
        status, error = STATUS_OK, None
        if q2 - q1 < cfg.min_interval_tokens:
            status, error = STATUS_SKIPPED, f"interval {t1:.2f}-{t2:.2f}s quantises to one time token ({q1})"
        out.append(ImoveItSample(
            sample_id=str(uuid.uuid5(NAMESPACE, f"{cap.instance_id}|{task}")), task=task,
            instance_id=cap.instance_id, clip_id=cap.clip_id, video_id=cap.video_id, video_path=cap.video_path,
            clip_start_s=cap.clip_start_s, clip_end_s=cap.clip_end_s, duration_s=duration, width=cap.width,
            height=cap.height, label=cap.label, t1_s=t1, t2_s=t2, t1_token=q1, t2_token=q2,
            box1_xyxy_px=list(cap.box1_xyxy_px), box2_xyxy_px=list(cap.box2_xyxy_px), box1_tokens=list(b1),
            box2_tokens=list(b2), static_caption=cap.static_caption, dynamic_caption=cap.dynamic_caption or "",
            template_id=f"{cfg.templates}:{tpl['id']}", conversations=conv, status=status, error=error))
    return out


def process(ctx: ShardContext) -> list[ImoveItSample]:
    cfg: TasksConfig = ctx.config
    templates = load_json_prompt("imove_it", cfg.templates)
    unknown = set(cfg.tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown iMOVE-IT tasks {sorted(unknown)}; known: {TASKS}")
    accepted = {v.instance_id for v in ctx.read_records("check", CaptionVerdict) if v.accepted}
    rows = []
    for cap in ctx.read_records("caption", Caption):
        if cap.instance_id in accepted and cap.dynamic_caption:
            rows += build_samples(cap, cfg, templates)
    return rows


STAGE = Stage(
    name="tasks", schema=SCHEMA, inputs=("caption", "check"), config_cls=TasksConfig, process=process,
    expert=lambda cfg: ("templates", cfg.templates), branch="imove_it",
    description="spatial grounding, temporal grounding and dynamic captioning samples with relative tokens",
)
