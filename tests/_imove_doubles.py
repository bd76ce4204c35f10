"""Test doubles for the iMOVE-IT perception stages that answer from the synthetic videos' ground truth.

:class:`SynthOracle` decodes every frame of each synthetic video once and remembers it by content hash, so
a double handed an image knows exactly which video and frame it is (and fails loudly if the stage passed
a frame that does not exist). The doubles then answer what a perfect expert would:

* ``tagger``: the categories of the objects on the frame, plus planted static tags (``sky``, ``blue sky``)
  and one alias tag (``toy``);
* ``detector``: the ground-truth box of every object of a requested category (the too-large object
  included), plus for ``toy`` a copy of the first object's box shifted by 1 px (a cross-tag duplicate for
  NMS), plus one "decoy" box on empty background under the first object's category (CLIP must drop it);
* ``clip``: scores only crops the detector / tracker doubles handed out (looked up by pixel hash and prompt):
  0.31 for true crops, 0.05 for decoys and for tracks planted as "lost" (``low_clip``);
* ``tracker``: ground-truth boxes on every streamed frame, except on ``drift`` objects whose box grows
  by ``drift_rate`` of its size per frame (the tracker "bleeding" onto the background) and ``vanish``
  objects reported invisible after the first two tracked frames (the tracker lost them).
"""
from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from experts.grounding_dino import Detection
from experts.samurai import TrackPoint
from experts.video import iter_frames
from schemas.clips import Clip
from stages.shared.geometry import box_iou, crop_box
from stages.ingest import content_hash
from stages.scenes import clip_id as make_clip_id
from stages.synth.videos import GroundTruth, SynthObject, load_truth

TRUE_CLIP = 0.31
LOW_CLIP = 0.05
STATIC_TAGS = (("sky", 0.85), ("blue sky", 0.8))
ALIAS_TAG = "toy"
TEMPLATE = "a photo of a {label}."


def digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes() + repr(image.shape).encode()).hexdigest()


@dataclass
class SynthVideo:
    path: Path
    truth: GroundTruth
    video_id: str

    def box(self, obj: SynthObject, frame: int) -> list[float] | None:
        for b in obj.boxes:
            if b[0] == frame:
                return [float(v) for v in b[1:]]
        return None

    def objects_at(self, frame: int, include_too_large: bool = True) -> list[tuple[SynthObject, list[float]]]:
        out = []
        for o in self.truth.objects:
            b = self.box(o, frame)
            if b is not None and (include_too_large or not o.too_large):
                out.append((o, b))
        return out

    def clips(self) -> list[Clip]:
        """One clip per ground-truth shot (what ``scenes`` finds on these hard cuts)."""
        fps = float(self.truth.fps)
        out = []
        for i, shot in enumerate(self.truth.shots):
            s, e = shot.start_frame, shot.end_frame + 1
            out.append(Clip(
                clip_id=make_clip_id(self.video_id, s / fps, e / fps), video_id=self.video_id,
                video_path=str(self.path), scene_index=i, part_index=0, start_frame=s, end_frame=e,
                start_s=s / fps, end_s=e / fps, duration_s=(e - s) / fps, fps=fps, width=self.truth.width,
                height=self.truth.height, stage="scenes", expert="fixture", config_hash="fixture",
                created_at=dt.datetime.now(dt.timezone.utc)))
        return out


@dataclass
class SynthOracle:
    videos: list[SynthVideo]
    drift: set[tuple[str, int]] = field(default_factory=set)  # (video file name, object_id)
    low_clip: set[tuple[str, int]] = field(default_factory=set)
    vanish: set[tuple[str, int]] = field(default_factory=set)  # lost after the first 2 tracked frames
    drift_rate: float = 0.06
    template: str = TEMPLATE

    def __post_init__(self) -> None:
        self.frames: dict[str, tuple[SynthVideo, int]] = {}
        for v in self.videos:
            for f in iter_frames(str(v.path)):
                self.frames[digest(f.image)] = (v, int(f.index))
        self.clip_scores: dict[tuple[str, str], float] = {}
        self.calls: dict[str, int] = {"tag": 0, "detect": 0, "track": 0, "score_pairs": 0}

    @classmethod
    def from_paths(cls, paths: Iterable[Path], **kw: Any) -> "SynthOracle":
        vids = [SynthVideo(Path(p), load_truth(Path(p).with_suffix(".json")), content_hash(str(p))) for p in paths]
        return cls(vids, **kw)

    def identify(self, image: np.ndarray) -> tuple[SynthVideo, int]:
        key = digest(image)
        if key not in self.frames:
            raise AssertionError(f"the stage passed an image {image.shape} that is no decoded frame of the "
                                 "synthetic videos")
        return self.frames[key]

    def register_crop(self, image: np.ndarray, box: Sequence[float], label: str, score: float) -> None:
        crop = crop_box(image, box)
        if crop is not None:
            self.clip_scores[(digest(crop), self.template.format(label=label))] = score

    # -- planted extras ------------------------------------------------------------------------------------
    @staticmethod
    def first_object(v: SynthVideo, frame: int) -> tuple[SynthObject, list[float]] | None:
        objs = sorted(v.objects_at(frame, include_too_large=False), key=lambda ob: ob[0].object_id)
        return objs[0] if objs else None

    @staticmethod
    def alias_box(box: Sequence[float]) -> list[float]:
        return [box[0] + 1.0, box[1] + 1.0, box[2] + 1.0, box[3] + 1.0]

    @staticmethod
    def decoy_box(v: SynthVideo, frame: int, size: int = 20) -> list[float] | None:
        taken = [b for _, b in v.objects_at(frame, include_too_large=False)]
        for y in range(4, v.truth.height - size - 4, 6):
            for x in range(4, v.truth.width - size - 4, 6):
                cand = [float(x), float(y), float(x + size), float(y + size)]
                if all(box_iou(cand, b) == 0.0 and not _touch(cand, b) for b in taken):
                    return cand
        return None

    # -- the doubles ---------------------------------------------------------------------------------------
    def tagger(self) -> "TruthTagger":
        return TruthTagger(self)

    def detector(self) -> "TruthDetector":
        return TruthDetector(self)

    def clip(self) -> "TruthClip":
        return TruthClip(self)

    def tracker(self) -> "TruthTracker":
        return TruthTracker(self)


def _touch(a: Sequence[float], b: Sequence[float]) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


class TruthTagger:
    def __init__(self, oracle: SynthOracle) -> None:
        self.o = oracle

    def tag(self, images: list[np.ndarray], batch_size: int = 8) -> list[list[tuple[str, float]]]:
        self.o.calls["tag"] += 1
        out = []
        for img in images:
            v, f = self.o.identify(img)
            cats = sorted({o.category for o, _ in v.objects_at(f)})
            tags = [(c, 0.9) for c in cats] + list(STATIC_TAGS)
            if self.o.first_object(v, f) is not None:
                tags.append((ALIAS_TAG, 0.5))
            out.append(tags)
        return out


class TruthDetector:
    def __init__(self, oracle: SynthOracle) -> None:
        self.o = oracle

    def detect(self, images, labels, box_threshold=0.35, text_threshold=0.25, batch_size=8) -> list[list[Detection]]:
        self.o.calls["detect"] += 1
        assert len(images) == len(labels)
        out = []
        for img, ls in zip(images, labels):
            v, f = self.o.identify(img)
            dets = []
            first = self.o.first_object(v, f)
            for label in ls:
                for obj, box in v.objects_at(f):
                    if obj.category == label:
                        dets.append(Detection(label, 0.9 - 0.01 * obj.object_id, tuple(box)))
                        self.o.register_crop(img, box, label, TRUE_CLIP)
                if label == ALIAS_TAG and first is not None:
                    box = self.o.alias_box(first[1])
                    dets.append(Detection(label, 0.4, tuple(box)))
                    self.o.register_crop(img, box, label, TRUE_CLIP)
                if first is not None and label == first[0].category:
                    decoy = self.o.decoy_box(v, f)
                    if decoy is not None:
                        dets.append(Detection(label, 0.6, tuple(decoy)))
                        self.o.register_crop(img, decoy, label, LOW_CLIP)
            out.append(sorted(dets, key=lambda d: -d.score))
        return out


class TruthClip:
    def __init__(self, oracle: SynthOracle) -> None:
        self.o = oracle

    def score_pairs(self, images: list[np.ndarray], texts: list[str], batch_size: int = 64) -> np.ndarray:
        self.o.calls["score_pairs"] += 1
        out = []
        for img, text in zip(images, texts):
            key = (digest(img), text)
            if key not in self.o.clip_scores:
                raise AssertionError(f"CLIP double: crop {img.shape} with prompt {text!r} was never handed out")
            out.append(self.o.clip_scores[key])
        return np.asarray(out, np.float32)


class TruthTracker:
    def __init__(self, oracle: SynthOracle) -> None:
        self.o = oracle

    def track(self, frames, prompts, timestamps_s=None, return_masks=False) -> list[TrackPoint]:
        self.o.calls["track"] += 1
        points: list[TrackPoint] = []
        targets: list[tuple[str, SynthObject]] = []
        video: SynthVideo | None = None
        for pos, item in enumerate(frames):
            image = getattr(item, "image", item)
            v, f = self.o.identify(image)
            if video is None:
                video = v
                for iid, box in prompts:
                    match = max(v.objects_at(f), key=lambda ob: box_iou(ob[1], box))
                    assert box_iou(match[1], box) > 0.99, f"prompt {box} matches no ground-truth box on frame {f}"
                    targets.append((iid, match[0]))
            assert v is video, "the stage streamed frames of two videos into one tracker call"
            for iid, obj in targets:
                box = v.box(obj, f)
                if box is not None and (v.path.name, obj.object_id) in self.o.drift:
                    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                    g = 1.0 + self.o.drift_rate * pos
                    hw, hh = (box[2] - box[0]) * g / 2, (box[3] - box[1]) * g / 2
                    box = [max(0.0, cx - hw), max(0.0, cy - hh), min(float(v.truth.width), cx + hw),
                           min(float(v.truth.height), cy + hh)]
                if (v.path.name, obj.object_id) in self.o.vanish and pos >= 2:
                    box = None
                if box is None:
                    points.append(TrackPoint(iid, pos, None, None, 0, -8.0, None, False))
                    continue
                score = LOW_CLIP if (v.path.name, obj.object_id) in self.o.low_clip else TRUE_CLIP
                self.o.register_crop(image, box, obj.category, score)
                area = int((box[2] - box[0]) * (box[3] - box[1]))
                points.append(TrackPoint(iid, pos, None, tuple(box), area, 8.0, 0.9 if pos else None, True))
        return points


# -- shared fixtures' workers ----------------------------------------------------------------------------------
SYNTH_SEED = 7
SYNTH_VIDEOS = 3
_ORACLES: dict[tuple, SynthOracle] = {}


def synth_config():
    from stages.synth.videos import SynthConfig

    # Every video gets a planted too-large object; 3 s at 25 fps, 1-3 shots.
    return SynthConfig(min_duration_s=3.0, max_duration_s=3.0, too_large_probability=1.0)


def synth_dir() -> Path:
    import os
    import tempfile

    base = os.environ.get("MOTIONFORGE_TINY_CACHE") or tempfile.mkdtemp(prefix="motionforge-imove-")
    return Path(base).parent / "imove_synth"


def synth_paths() -> list[Path]:
    from stages.synth.videos import render_dataset

    return render_dataset(synth_dir(), SYNTH_VIDEOS, SYNTH_SEED, synth_config())


def oracle(drift: Iterable[tuple[str, int]] = (), low_clip: Iterable[tuple[str, int]] = (),
           vanish: Iterable[tuple[str, int]] = ()) -> SynthOracle:
    """A fresh oracle (own CLIP registry and call counts) sharing the decoded-frame index of the videos."""
    key = tuple(str(p) for p in synth_paths())
    if key not in _ORACLES:
        _ORACLES[key] = SynthOracle.from_paths(synth_paths())
    base = _ORACLES[key]
    o = SynthOracle.__new__(SynthOracle)
    o.videos, o.frames = base.videos, base.frames
    o.drift, o.low_clip, o.vanish = set(drift), set(low_clip), set(vanish)
    o.drift_rate, o.template = base.drift_rate, base.template
    o.clip_scores, o.calls = {}, {"tag": 0, "detect": 0, "track": 0, "score_pairs": 0}
    return o


def all_clips(o: SynthOracle) -> list[Clip]:
    return [c for v in o.videos for c in v.clips()]


def video_of(o: SynthOracle, video_path: str) -> SynthVideo:
    return next(v for v in o.videos if str(v.path) == video_path)
