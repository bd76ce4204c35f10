"""describe: a dynamic-information description per clip (MotionBench 3.1 "Question Answer Annotation", 9.1).

The paper's annotators wrote captions "that focus on the dynamic changes within the video", with the first
frame described separately (Fig. 4). Here each clip gets either

* a **human** description imported with ``motionforge import descriptions FILE --out ROOT`` (JSONL keyed by
  ``clip_id``, or by ``video_path`` with optional ``start_s``/``end_s``), stored under
  ``ROOT/describe/_imported/`` and preferred over the VLM; or
* a **VLM** description: one request for the first frame alone, one over ``num_frames`` uniformly sampled
  frames for what moves, how and in what order (prompts in ``stages/data/motionbench/describe_prompt.v1.txt``).

Imported files are an external input of the stage (``Stage.external_inputs``): importing a new file changes
every describe shard's input fingerprint, so ``status`` shows them stale and the next run redoes them.
Clips of synthetic videos (a ground-truth ``.json`` beside the video) are skipped by default: their
questions come from the ground truth (``synthqa``), as the paper's virtual videos do.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

from pydantic import Field

from experts.vlm import VlmSpec
from schemas._base import STATUS_ERROR, STATUS_SKIPPED
from schemas.clips import Clip
from schemas.descriptions import SCHEMA, Description
from stages.shared.prompts import DATA_DIR as SHARED_DATA_DIR
from stages.base import Resources, ShardContext, Stage, StageConfig, chat_resources, vlm_expert_name
from storage.root import OutputRoot

DATA_DIR = SHARED_DATA_DIR / "motionbench"
IMPORT_DIR = ("describe", "_imported")
TEXT_FIELDS = ("dynamic_description", "description", "caption", "dynamic")
FIRST_FRAME_FIELDS = ("first_frame_description", "first_frame")


class DescribeConfig(StageConfig):
    vlm: VlmSpec = VlmSpec(model_id="gpt-4o", backend="openai", max_new_tokens=512, max_image_side_px=768)
    num_frames: int = Field(16, ge=2, le=256)
    frame_short_side_px: int | None = Field(448, ge=32)  # MotionBench keeps videos with a short side >= 448
    prompt_file: str = "describe_prompt.v1.txt"
    use_imported: bool = True  # human descriptions win over the VLM
    require_imported: bool = False  # True: a clip without a human description is an error row, no VLM call
    skip_synthetic: bool = True  # videos with ground truth beside them get questions from synthqa instead


PROFILES = {
    "small": {"vlm": {"model_id": "Qwen/Qwen2-VL-2B-Instruct", "backend": "transformers"}, "num_frames": 8},
    "tiny": {"vlm": {"model_id": "tiny://qwen2_vl", "backend": "transformers", "max_new_tokens": 16},
             "num_frames": 2, "frame_short_side_px": 64},
}


# -- prompts -------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def load_prompts(name: str) -> tuple[str, str, str]:
    """(first-frame prompt, dynamic prompt template, version) from a describe prompt file."""
    path = DATA_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"describe prompt file {path} not found")
    raw = path.read_text(encoding="utf-8")
    parts: dict[str, list[str]] = {}
    current = None
    for ln in raw.splitlines():
        if ln.startswith("#"):
            continue
        if ln.startswith("=== ") and ln.endswith(" ==="):
            current = ln[4:-4].strip()
            parts[current] = []
        elif current is not None:
            parts[current].append(ln)
    if set(parts) != {"first_frame", "dynamic"}:
        raise ValueError(f"{path}: needs exactly the sections '=== first_frame ===' and '=== dynamic ===', got {sorted(parts)}")
    stem = name.rsplit(".", 1)[0]
    return ("\n".join(parts["first_frame"]).strip(), "\n".join(parts["dynamic"]).strip(),
            f"{stem}@{hashlib.sha256(raw.encode()).hexdigest()[:8]}")


# -- imported human descriptions -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HumanDescription:
    dynamic_description: str
    first_frame_description: str | None = None
    clip_id: str | None = None
    video_path: str | None = None
    start_s: float | None = None
    end_s: float | None = None
    annotator: str | None = None


def parse_import_line(obj: Any, where: str) -> HumanDescription:
    """One JSONL line -> HumanDescription; ValueError saying what is missing."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object")
    text = next((obj[k] for k in TEXT_FIELDS if isinstance(obj.get(k), str) and obj[k].strip()), None)
    if text is None:
        raise ValueError(f"{where}: no description text (one of {', '.join(TEXT_FIELDS)})")
    clip_id = obj.get("clip_id")
    video = obj.get("video_path") or obj.get("video")
    if not clip_id and not video:
        raise ValueError(f"{where}: needs 'clip_id' or 'video_path' to say which clip it describes")
    first = next((obj[k] for k in FIRST_FRAME_FIELDS if isinstance(obj.get(k), str) and obj[k].strip()), None)

    def num(k: str) -> float | None:
        v = obj.get(k)
        if v is None:
            return None
        try:
            return float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {k}={v!r} is not a number of seconds") from None

    return HumanDescription(dynamic_description=text.strip(), first_frame_description=first.strip() if first else None,
                            clip_id=str(clip_id) if clip_id else None, video_path=str(video) if video else None,
                            start_s=num("start_s"), end_s=num("end_s"),
                            annotator=str(obj["annotator"]) if obj.get("annotator") else None)


def read_import_file(path: str | Path) -> list[HumanDescription]:
    out, problems = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(parse_import_line(json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{n}: not JSON ({exc.msg})")
            except ValueError as exc:
                problems.append(str(exc))
    if problems:
        raise ValueError("cannot import descriptions:\n  " + "\n  ".join(problems[:20]))
    return out


def store_import(root: OutputRoot, items: list[HumanDescription]) -> str:
    """Write the parsed items under ROOT/describe/_imported/<digest>.jsonl (same content -> same file)."""
    lines = [json.dumps(dataclasses.asdict(i), sort_keys=True, ensure_ascii=False) for i in items]
    blob = ("\n".join(lines) + "\n").encode()
    name = f"{hashlib.sha256(blob).hexdigest()[:16]}.jsonl"
    path = root.path(*IMPORT_DIR, name)
    root.write_bytes_atomic(path, blob)
    return path


def _import_files(root: OutputRoot) -> list[str]:
    return [n for n in root.list_dir(root.path(*IMPORT_DIR)) if n.endswith(".jsonl")]


def imported_fingerprint(root: OutputRoot, shard: int) -> dict[str, str]:
    files = _import_files(root)
    if not files:
        return {}
    return {"describe-imports": "imp-" + hashlib.sha256("|".join(files).encode()).hexdigest()[:16]}


def imported_fingerprints(root: OutputRoot, shards: list[int]) -> list[dict[str, str]]:
    """:func:`imported_fingerprint` of each shard: the same for all (imports are not per shard), listed once."""
    fp = imported_fingerprint(root, 0)
    return [dict(fp) for _ in shards]


def load_imported(root: OutputRoot) -> list[HumanDescription]:
    """Every stored import, file by file in name order; for a clip keyed twice the last match wins."""
    out = []
    for name in _import_files(root):
        for line in root.read_bytes(root.path(*IMPORT_DIR, name)).decode().splitlines():
            if line.strip():
                out.append(HumanDescription(**json.loads(line)))
    return out


def _norm_path(p: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(p))) if not p.startswith(("s3://", "gs://", "http")) else p


def match_human(clip: Clip, clips_of_video: int, imported: list[HumanDescription], tol_s: float = 0.05
                ) -> tuple[HumanDescription | None, str | None]:
    """The human description for ``clip`` (or None), and an error when one exists but cannot be applied."""
    by_clip = [h for h in imported if h.clip_id == clip.clip_id]
    if by_clip:
        return by_clip[-1], None
    paths = {_norm_path(clip.video_path), _norm_path(clip.clip_path)} if clip.clip_path else {_norm_path(clip.video_path)}
    names = {os.path.basename(p) for p in paths}
    cands = [h for h in imported if h.video_path and (
        _norm_path(h.video_path) in paths or ("/" not in h.video_path and h.video_path in names))]
    if not cands:
        return None, None
    timed = [h for h in cands if h.start_s is not None and h.end_s is not None]
    for h in timed:
        if abs(h.start_s - clip.start_s) <= tol_s and abs(h.end_s - clip.end_s) <= tol_s:
            return h, None
    untimed = [h for h in cands if h.start_s is None or h.end_s is None]
    if untimed:
        if clips_of_video == 1:
            return untimed[-1], None
        return None, (f"a human description is keyed by video path {untimed[-1].video_path!r} but that video has "
                      f"{clips_of_video} clips; key it by clip_id or give start_s/end_s "
                      f"(this clip is {clip.start_s:.2f}-{clip.end_s:.2f} s)")
    return None, None


def is_synthetic(video_path: str) -> bool:
    """A synthetic video (stages.synth.videos) has its ground-truth JSON beside it, same stem."""
    truth = Path(video_path).with_suffix(".json")
    if not truth.is_file():
        return False
    try:
        head = json.loads(truth.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(head, dict) and "objects" in head and "version" in head


# -- rows ----------------------------------------------------------------------------------------------------
def _row(clip: Clip, **kw: Any) -> Description:
    return Description(clip_id=clip.clip_id, video_id=clip.video_id, video_path=clip.video_path,
                       clip_path=clip.clip_path, start_s=clip.start_s, end_s=clip.end_s, **kw)


def describe_with_vlm(clips: list[Clip], vlm: Any, cfg: DescribeConfig, load_frames) -> list[Description]:
    """Two requests per clip (first frame; uniform frames as a video). ``load_frames(clip)`` -> (first, frames).

    Frames are decoded on a prefetch thread, a batch ahead of the model (:mod:`stages.shared.prefetch`)."""
    from experts.vlm import VlmRequest
    from stages.shared.prefetch import model_batch_size, prefetched_batches

    first_prompt, dyn_template, version = load_prompts(cfg.prompt_file)
    rows: dict[str, Description] = {}
    size = model_batch_size(cfg.vlm)
    for batch in prefetched_batches(clips, load_frames, size):
        reqs, owners = [], []
        for clip, loaded in batch:
            if isinstance(loaded, Exception):  # one unreadable clip is one error row
                rows[clip.clip_id] = _row(clip, source="vlm", status=STATUS_ERROR, prompt_version=version,
                                          error=f"cannot read frames of clip {clip.clip_id} ({clip.video_path} "
                                                f"{clip.start_s:.2f}-{clip.end_s:.2f} s): {type(loaded).__name__}: {loaded}")
                continue
            first, frames = loaded
            if len(frames) < 2:
                rows[clip.clip_id] = _row(clip, source="vlm", status=STATUS_ERROR, prompt_version=version,
                                          error=f"clip {clip.clip_id} yielded {len(frames)} frame(s); at least 2 are "
                                                "needed to describe motion")
                continue
            dyn = dyn_template.format(num_frames=len(frames), duration_s=clip.end_s - clip.start_s)
            reqs += [VlmRequest(text=first_prompt, images=(first,)),
                     VlmRequest(text=dyn, images=tuple(frames), as_video=True)]
            owners.append((clip, len(frames)))
        responses = vlm.generate(reqs) if reqs else []
        for k, (clip, n) in enumerate(owners):
            r_first, r_dyn = responses[2 * k], responses[2 * k + 1]
            problems = [f"{what}: {r.error}" for what, r in (("first-frame request", r_first), ("motion request", r_dyn))
                        if r.error is not None]
            if not problems and not (r_dyn.text or "").strip():
                problems.append("the motion description came back empty")
            if problems:
                rows[clip.clip_id] = _row(clip, source="vlm", num_frames=n, prompt_version=version, status=STATUS_ERROR,
                                          error=f"describe clip {clip.clip_id}: " + "; ".join(problems)
                                                + "; re-run describe when the VLM works")
                continue
            rows[clip.clip_id] = _row(clip, source="vlm", num_frames=n, prompt_version=version,
                                      first_frame_description=(r_first.text or "").strip() or None,
                                      dynamic_description=r_dyn.text.strip())
    return [rows[c.clip_id] for c in clips if c.clip_id in rows]


def plan_descriptions(clips: list[Clip], imported: list[HumanDescription], cfg: DescribeConfig
                      ) -> tuple[list[Description], list[Clip]]:
    """Rows that need no model (human, synthetic-skipped, errors) and the clips left for the VLM."""
    per_video: dict[str, int] = {}
    for c in clips:
        per_video[c.video_id] = per_video.get(c.video_id, 0) + 1
    synthetic: dict[str, bool] = {}
    done, todo = [], []
    for clip in clips:
        if cfg.skip_synthetic and clip.video_path not in synthetic:
            synthetic[clip.video_path] = is_synthetic(clip.video_path)
        if cfg.skip_synthetic and synthetic[clip.video_path]:
            done.append(_row(clip, source="synthetic", status=STATUS_SKIPPED,
                             error="synthetic video with ground truth: its questions come from synthqa"))
            continue
        human, problem = match_human(clip, per_video[clip.video_id], imported) if cfg.use_imported else (None, None)
        if problem:
            done.append(_row(clip, source="human", status=STATUS_ERROR, error=problem))
        elif human is not None:
            done.append(_row(clip, source="human", annotator=human.annotator,
                             first_frame_description=human.first_frame_description,
                             dynamic_description=human.dynamic_description))
        elif cfg.require_imported:
            done.append(_row(clip, source="human", status=STATUS_ERROR,
                             error=f"no human description for clip {clip.clip_id} ({clip.video_path}) and "
                                   "describe.require_imported is set; import one with `motionforge import descriptions`"))
        else:
            todo.append(clip)
    return done, todo


def _frame_loader(cfg: DescribeConfig):
    from experts.video import read_frames

    def load(clip: Clip):
        path = clip.clip_path or clip.video_path
        offset = 0.0 if clip.clip_path else clip.start_s
        end = offset + (clip.end_s - clip.start_s)
        frames = [f.image for f in read_frames(path, offset, end, num_frames=cfg.num_frames,
                                               short_side=cfg.frame_short_side_px)]
        if not frames:
            raise ValueError("no frames decoded in the clip's span")
        return frames[0], frames

    return load


def process(ctx: ShardContext) -> Iterable[Description]:
    from experts.vlm import load_vlm

    cfg: DescribeConfig = ctx.config
    clips = ctx.read_records("scenes", Clip)
    imported = load_imported(ctx.root) if cfg.use_imported else []
    done, todo = plan_descriptions(clips, imported, cfg)
    vlm_rows: list[Description] = []
    if todo:
        vlm = ctx.chat_expert("describe.vlm", cfg.vlm, load_vlm)
        vlm_rows = describe_with_vlm(todo, vlm, cfg, _frame_loader(cfg))
    by_id = {r.clip_id: r for r in done + vlm_rows}
    ctx.progress(len(clips), len(clips))
    return [by_id[c.clip_id] for c in clips]


STAGE = Stage(
    name="describe", schema=SCHEMA, inputs=("scenes",), config_cls=DescribeConfig, process=process,
    expert=vlm_expert_name, resources=Resources(cpus=1, gpus=1.0),
    resources_fn=lambda cfg: chat_resources(Resources(cpus=1, gpus=1.0), cfg.vlm),
    branch="motionbench", external_inputs=imported_fingerprint,
    external_inputs_of=imported_fingerprints,
    description="dynamic-information description per clip (VLM, or imported human notes)",
)
