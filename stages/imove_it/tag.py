"""tag: what categories are on a clip's first frame (iMOVE 3.1.1 Step-1: Instance Recognition).

The paper runs the tagging expert RAM++ on the initial frame and has people strike static categories
("cloud, sky, road, and room"). Here the strike list is a file shipped with the package
(``stages/data/static_blocklist.txt``, editable) that the config can extend or trim. A lighter backend,
CLIP zero-shot tagging over a fixed vocabulary, can stand in for RAM++ (``tagger="clip"``).

One row per clip: kept tags (they become Grounding DINO prompts in ``detect``), tags dropped by the
blocklist, the clip span and the decoded frame size. A clip whose first frame cannot be decoded is an
error row; a clip with no tags left is an ok row with an empty ``tags`` list.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from pydantic import Field, field_validator

from experts.clip import ClipSpec
from experts.ram_plus import RamPlusSpec
from schemas._base import STATUS_ERROR
from schemas.clips import Clip
from schemas.tags import SCHEMA, ClipTags
from stages.shared.prompts import DATA_DIR as SHARED_DATA_DIR
from stages.base import Resources, ShardContext, Stage, StageConfig
from stages.imove_it.first_frame import FirstFrame, FrameReadError, clip_first_frame

DATA_DIR = SHARED_DATA_DIR
DEFAULT_BLOCKLIST_FILE = DATA_DIR / "static_blocklist.txt"
DEFAULT_CLIP_VOCABULARY_FILE = DATA_DIR / "clip_tag_vocabulary.txt"

# The expert names under which ShardContext.expert looks up overrides (test doubles, notebooks).
TAGGER_EXPERT = "tag.tagger"


class TagConfig(StageConfig):
    tagger: Literal["ram_plus", "clip"] = "ram_plus"
    ram_plus: RamPlusSpec = Field(default_factory=RamPlusSpec)
    # The CLIP zero-shot tagger: cosine(image, "a photo of a {tag}.") over ``clip_vocabulary_file``.
    clip: ClipSpec = Field(default_factory=ClipSpec)  # ViT-B/32, OpenAI weights
    clip_template: str = "a photo of a {label}."
    clip_vocabulary_file: str | None = None  # None: the shipped stages/data/clip_tag_vocabulary.txt
    clip_threshold: float = 0.25
    clip_top_k: int = 10
    # Static-category blocklist: the file (None: the shipped one) plus ``block_extra`` minus ``block_allow``.
    blocklist_file: str | None = None
    block_extra: tuple[str, ...] = ()
    block_allow: tuple[str, ...] = ()
    match_head_noun: bool = True  # "blue sky" is blocked because "sky" is
    min_score: float = 0.0  # tags scored below this are not kept (on top of the tagger's own thresholds)
    max_tags: int | None = None  # keep at most this many (highest scores) per clip
    batch_size: int = 8
    # Throughput only (left out of the config hash): first frames decoded ahead of the tagger on a prefetch
    # thread (None: one batch; 0: decode inline).
    prefetch_depth: int | None = Field(None, ge=0)

    RUN_ONLY_FIELDS = frozenset({"prefetch_depth"})

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"batch_size must be >= 1, got {v}")
        return v

    @field_validator("max_tags")
    @classmethod
    def _max_tags(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"max_tags must be >= 1 or None, got {v}")
        return v

    def model_specs(self) -> list:
        """The one model this config will load (the other tagger's spec is unused)."""
        return [self.ram_plus if self.tagger == "ram_plus" else self.clip]


PROFILES = {
    # RAM++ ships only as Swin-L; the smallest real tagger is CLIP ViT-B/32 over the shipped vocabulary.
    "small": {"tagger": "clip", "clip": {"model_id": "openai", "arch": "ViT-B-32"}},
    # Random weights give arbitrary scores: keep every tag the tiny tagger emits, at most 3 per clip.
    "tiny": {"tagger": "ram_plus", "ram_plus": {"model_id": "tiny://ram_plus"}, "clip": {"model_id": "tiny://clip"},
             "clip_threshold": -1.0, "clip_top_k": 3, "max_tags": 3},
}


# -- pure functions ------------------------------------------------------------------------------------------
def normalise_tag(tag: str) -> str:
    return re.sub(r"\s+", " ", tag.strip().lower()).strip(" .")


def read_word_list(path: str | Path) -> list[str]:
    """One entry per line; blank lines and ``#`` comments ignored; normalised, order kept, duplicates removed."""
    out: dict[str, None] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        word = normalise_tag(line.split("#", 1)[0])
        if word:
            out.setdefault(word)
    return list(out)


def load_blocklist(cfg: TagConfig) -> frozenset[str]:
    path = cfg.blocklist_file or DEFAULT_BLOCKLIST_FILE
    if not Path(path).exists():
        raise FileNotFoundError(f"tag: blocklist file {path} does not exist; fix tag.blocklist_file or set it to null "
                                f"for the shipped list")
    words = set(read_word_list(path)) | {normalise_tag(w) for w in cfg.block_extra}
    return frozenset(words - {normalise_tag(w) for w in cfg.block_allow})


def blocked(tag: str, blocklist: frozenset[str], match_head_noun: bool = True) -> bool:
    t = normalise_tag(tag)
    if t in blocklist:
        return True
    return match_head_noun and " " in t and t.rsplit(" ", 1)[1] in blocklist


def _as_pair(item: Any) -> tuple[str, float]:
    if hasattr(item, "tag"):
        return str(item.tag), float(item.score)
    tag, score = item
    return str(tag), float(score)


def split_tags(predicted: Iterable[Any], blocklist: frozenset[str], *, match_head_noun: bool = True,
               min_score: float = 0.0, max_tags: int | None = None) -> tuple[list[dict], list[dict]]:
    """Tagger output -> (kept, dropped_by_blocklist), each ``[{"tag", "score"}]`` by descending score.

    Tags are normalised and de-duplicated (best score wins). Tags below ``min_score`` or past ``max_tags``
    are neither kept nor listed as dropped: they are below the tagger's bar, not static.
    """
    best: dict[str, float] = {}
    for item in predicted:
        tag, score = _as_pair(item)
        t = normalise_tag(tag)
        if t and (t not in best or score > best[t]):
            best[t] = score
    ordered = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))
    kept, dropped = [], []
    for t, s in ordered:
        if blocked(t, blocklist, match_head_noun):
            dropped.append({"tag": t, "score": s})
        elif s >= min_score and (max_tags is None or len(kept) < max_tags):
            kept.append({"tag": t, "score": s})
    return kept, dropped


def tag_row(clip: Clip, tagger: str, **kw: Any) -> ClipTags:
    return ClipTags(
        clip_id=clip.clip_id, video_id=clip.video_id, video_path=clip.video_path, start_frame=clip.start_frame,
        end_frame=clip.end_frame, start_s=clip.start_s, end_s=clip.end_s, duration_s=clip.duration_s,
        fps=clip.fps, tagger=tagger, **{"tags": [], "dropped_tags": [], **kw},
    )


def tag_clips(clips: Sequence[Clip], tagger: Any, cfg: TagConfig, blocklist: frozenset[str],
              read_frame=clip_first_frame, progress=lambda done, total: None) -> list[ClipTags]:
    """One row per clip. Frames are read on a prefetch thread, ``prefetch_depth`` clips (default: one batch)
    ahead of the tagger (decode overlaps the model; memory stays bounded), and tagged a batch of clips at a time."""
    from stages.shared.prefetch import prefetched_batches

    rows: list[ClipTags] = []
    done = 0
    for chunk in prefetched_batches(clips, lambda c: read_frame(c.video_path, c.start_s, c.end_s), cfg.batch_size,
                                    cfg.prefetch_depth):
        frames: list[tuple[Clip, FirstFrame]] = []
        for clip, frame in chunk:
            if isinstance(frame, FrameReadError):
                rows.append(tag_row(clip, cfg.tagger, status=STATUS_ERROR, error=f"clip {clip.clip_id}: {frame}"))
            elif isinstance(frame, Exception):
                raise frame  # not a per-clip read problem: the shard fails and is retried, as before
            else:
                frames.append((clip, frame))
        if frames:
            predicted = tagger.tag([f.image for _, f in frames], batch_size=cfg.batch_size)
            if len(predicted) != len(frames):
                raise RuntimeError(f"tagger returned {len(predicted)} results for {len(frames)} images")
            for (clip, frame), preds in zip(frames, predicted):
                kept, dropped = split_tags(preds, blocklist, match_head_noun=cfg.match_head_noun,
                                           min_score=cfg.min_score, max_tags=cfg.max_tags)
                h, w = frame.image.shape[:2]
                rows.append(tag_row(clip, cfg.tagger, width=w, height=h, frame_t_s=frame.t_s, tags=kept,
                                    dropped_tags=dropped))
        done += len(chunk)
        progress(done, len(clips))
    order = {c.clip_id: i for i, c in enumerate(clips)}
    return sorted(rows, key=lambda r: order[r.clip_id])


# -- the stage -----------------------------------------------------------------------------------------------
def load_tagger(cfg: TagConfig):
    """The configured tagging expert, loaded once per process."""
    from experts.base import get_expert

    if cfg.tagger == "ram_plus":
        from experts.ram_plus import load_ram_plus

        return get_expert(cfg.ram_plus, load_ram_plus)
    from experts.clip import ClipTagger, load_clip

    vocabulary = read_word_list(cfg.clip_vocabulary_file or DEFAULT_CLIP_VOCABULARY_FILE)
    return ClipTagger(get_expert(cfg.clip, load_clip), vocabulary, threshold=cfg.clip_threshold, top_k=cfg.clip_top_k,
                      template=cfg.clip_template)


def process(ctx: ShardContext) -> list[ClipTags]:
    cfg: TagConfig = ctx.config
    clips = ctx.read_records("scenes", Clip)
    blocklist = load_blocklist(cfg)
    if not clips:
        return []
    tagger = ctx.expert(TAGGER_EXPERT, lambda: load_tagger(cfg))
    return tag_clips(clips, tagger, cfg, blocklist, progress=ctx.progress)


def _expert(cfg: TagConfig) -> tuple[str, str | None]:
    spec = cfg.ram_plus if cfg.tagger == "ram_plus" else cfg.clip
    return f"{cfg.tagger}:{spec.model_id}", spec.revision


STAGE = Stage(
    name="tag", schema=SCHEMA, inputs=("scenes",), config_cls=TagConfig, process=process, expert=_expert,
    resources=Resources(cpus=1, gpus=1), branch="imove_it",
    description="RAM++ (or CLIP) tags on each clip's first frame, minus static categories",
)
