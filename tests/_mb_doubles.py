"""Test doubles and fixtures for the MotionBench branch: scripted LLM / VLM backends and small output roots.

The LLM double is the real :class:`experts.llm.Llm` over a scripted backend, so the repair re-ask loop of
``generate_json`` is the production one. The VLM double records every request (tests check that judges saw
exactly one image) and answers with a function of the request.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any, Callable

from experts.llm import ChatItem, Llm, LlmResponse, LlmSpec
from experts.vlm import VlmRequest, VlmResponse
from schemas.clips import SCHEMA as CLIPS_SCHEMA, Clip
from schemas.videos import SCHEMA as VIDEOS_SCHEMA, Video
from stages.base import Stage, StageConfig
from stages.runner import run_shard
from storage.manifest import record_plan
from storage.root import OutputRoot


class ScriptedChatBackend:
    """``reply(messages, attempt)`` -> text; ``attempt`` counts calls for the same first user message."""

    def __init__(self, reply: Callable[[list[dict], int], str]):
        self.reply = reply
        self.calls: list[list[dict]] = []
        self._attempts: dict[str, int] = {}

    def run(self, items: list[ChatItem]) -> list[LlmResponse]:
        out = []
        for it in items:
            self.calls.append(it.messages)
            first_user = next(m["content"] for m in it.messages if m["role"] == "user")
            n = self._attempts.get(first_user, 0)
            self._attempts[first_user] = n + 1
            out.append(LlmResponse(self.reply(it.messages, n), None, False, "scripted-llm"))
        return out


def scripted_llm(reply: Callable[[list[dict], int], str]) -> tuple[Llm, ScriptedChatBackend]:
    backend = ScriptedChatBackend(reply)
    return Llm(LlmSpec(model_id="scripted-llm", backend="transformers"), backend), backend


class ScriptedVlm:
    """A Vlm stand-in: ``answer(request)`` -> text (or an Exception instance for a failed item)."""

    def __init__(self, answer: Callable[[VlmRequest], Any], name: str = "scripted-vlm"):
        self.answer = answer
        self.name = name
        self.requests: list[VlmRequest] = []

    def generate(self, requests: list[VlmRequest]) -> list[VlmResponse]:
        out = []
        for r in requests:
            self.requests.append(r)
            a = self.answer(r)
            if isinstance(a, Exception):
                out.append(VlmResponse(None, str(a), False, self.name))
            else:
                out.append(VlmResponse(a, None, False, self.name))
        return out


# -- output roots with upstream tables ----------------------------------------------------------------------
class _Cfg(StageConfig):
    pass


def seed_stage(root: OutputRoot, name: str, schema, rows_by_shard: dict[int, list]) -> None:
    """Write an upstream stage's shards (with markers) through the real runner."""
    stage = Stage(name=name, schema=schema, inputs=(), config_cls=_Cfg,
                  process=lambda ctx: rows_by_shard.get(ctx.shard, []))
    for shard in rows_by_shard:
        run_shard(stage, root, _Cfg(), shard, force=True)


def make_plan(root: OutputRoot, videos_by_shard: dict[int, list[str]]) -> None:
    record_plan(root, {"version": 1, "shard_size": 8,
                       "shards": [videos_by_shard[k] for k in sorted(videos_by_shard)]})


def clip_for(video: Path, video_id: str, index: int, start_s: float, end_s: float, fps: float = 25.0) -> Clip:
    cid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{video_id}:{start_s}:{end_s}"))
    return Clip(clip_id=cid, video_id=video_id, video_path=str(video), scene_index=index, part_index=0,
                start_frame=int(start_s * fps), end_frame=int(end_s * fps), start_s=start_s, end_s=end_s,
                duration_s=end_s - start_s, fps=fps, width=64, height=48)


def video_row(path: Path, video_id: str, shard: int, duration_s: float) -> Video:
    return Video(video_id=video_id, uri=str(path), path=str(path), shard=shard, duration_s=duration_s, fps=25.0,
                 width=320, height=240)


def seed_clips(root: OutputRoot, clips_by_shard: dict[int, list[Clip]]) -> None:
    make_plan(root, {k: sorted({c.video_path for c in v}) for k, v in clips_by_shard.items()})
    seed_stage(root, "scenes", CLIPS_SCHEMA, clips_by_shard)


def seed_videos(root: OutputRoot, videos_by_shard: dict[int, list[Video]]) -> None:
    seed_stage(root, "ingest", VIDEOS_SCHEMA, videos_by_shard)


def question_json(stem: str, options: list[str], answer: str, content: str = "1.1", logic: int = 1, **extra) -> dict:
    return {"question": stem, "options": options, "answer": answer, "content_dimensions": [content],
            "logic_dimension": logic, "explanation": "the person does it", **extra}


def reply(*questions: dict) -> str:
    return json.dumps({"questions": list(questions)})


def replace(obj, **kw):
    return dataclasses.replace(obj, **kw)
