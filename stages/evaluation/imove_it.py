"""iMOVE-IT evaluation metrics (pure functions): temporal grounding, spatial grounding, dynamic captioning.

* temporal grounding (iMOVE Table 2, Charades-STA protocol): per query the temporal IoU of the predicted
  span with the ground truth; R@m = share of queries with IoU >= m for m in {0.3, 0.5, 0.7}; mIoU = mean IoU.
* spatial grounding: the answer holds a box at t1 and a box at t2 (3.1.2); every box is scored on its own:
  mean box IoU and accuracy at IoU >= 0.5.
* dynamic captioning: BLEU-1..4, ROUGE-L, CIDEr from ``pycocoevalcap`` (the COCO caption scorer's own code);
  METEOR too when a Java runtime works (its scorer is a jar). SPICE is never run: it downloads Stanford
  CoreNLP models at run time, which these machines cannot do.

Answers are read with the relative-token codec of 3.2.2 (:mod:`stages.shared.relative_tokens`). An answer
without the tokens a task needs is *unparseable*: it scores IoU 0 (a miss) and its sample id is listed, so a
model cannot raise its score by answering less. A reversed predicted span (end before start) is parseable
and is read as the span between its two times.

Charades-STA annotations (``vid start end##sentence`` per line, seconds) feed the same temporal scorer.
"""
from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from stages.shared.geometry import box_iou
from stages.shared.relative_tokens import N_SPACE, N_TIME, dequantize_box, dequantize_time, parse_boxes, parse_times

IOU_THRESHOLDS = (0.3, 0.5, 0.7)
BOX_ACC_IOU = 0.5


# -- temporal grounding ---------------------------------------------------------------------------------------
def temporal_iou(pred: Sequence[float], gt: Sequence[float]) -> float:
    """IoU of two [start, end] spans (seconds or tokens); 0 when they do not overlap or a span is empty."""
    ps, pe = pred
    gs, ge = gt
    inter = min(pe, ge) - max(ps, gs)
    if inter <= 0:
        return 0.0
    union = max(pe, ge) - min(ps, gs)
    return inter / union if union > 0 else 0.0


def parse_time_span(answer: str | None, duration_s: float, n_time: int = N_TIME) -> tuple[float, float] | None:
    """The first two time tokens of ``answer`` as a span in seconds of the clip, or None if there are fewer."""
    if not answer:
        return None
    times = parse_times(answer)
    if len(times) < 2:
        return None
    a, b = (dequantize_time(q, duration_s, n_time) for q in times[:2])
    return (min(a, b), max(a, b))


@dataclasses.dataclass(frozen=True)
class TemporalScores:
    n: int
    recall: dict[str, float]  # "R@0.3" -> share of queries with IoU >= 0.3
    miou: float
    unparseable: list[str]
    ious: dict[str, float]

    def as_dict(self) -> dict:
        return {"n": self.n, **self.recall, "mIoU": self.miou, "unparseable": list(self.unparseable)}


def score_temporal(gt: Mapping[str, Sequence[float]], pred: Mapping[str, Sequence[float] | None],
                   thresholds: Sequence[float] = IOU_THRESHOLDS) -> TemporalScores:
    """Score predicted spans against ground-truth spans, both keyed by query id. A query with no prediction
    (missing key or None) is a miss with IoU 0 and is listed as unparseable."""
    if not gt:
        raise ValueError("no ground-truth queries to score")
    ious: dict[str, float] = {}
    missing: list[str] = []
    for qid, span in gt.items():
        p = pred.get(qid)
        if p is None:
            missing.append(qid)
            ious[qid] = 0.0
        else:
            ious[qid] = temporal_iou(p, span)
    n = len(gt)
    recall = {f"R@{m:g}": sum(1 for v in ious.values() if v >= m) / n for m in thresholds}
    return TemporalScores(n=n, recall=recall, miou=sum(ious.values()) / n, unparseable=missing, ious=ious)


# -- spatial grounding ----------------------------------------------------------------------------------------
def parse_two_boxes(answer: str | None, width: int, height: int, n_space: int = N_SPACE) -> list[tuple[float, ...]]:
    """Up to the first two boxes of ``answer`` in pixels (fewer when the answer holds fewer)."""
    if not answer:
        return []
    return [dequantize_box(b, width, height, n_space) for b in parse_boxes(answer)[:2]]


@dataclasses.dataclass(frozen=True)
class SpatialScores:
    n_samples: int
    n_boxes: int
    mean_iou: float
    acc_at_05: float
    unparseable: list[str]

    def as_dict(self) -> dict:
        return {"n_samples": self.n_samples, "n_boxes": self.n_boxes, "box_mIoU": self.mean_iou,
                "Acc@0.5": self.acc_at_05, "unparseable": list(self.unparseable)}


def score_spatial(gt: Mapping[str, Sequence[Sequence[float]]],
                  pred: Mapping[str, Sequence[Sequence[float]] | None]) -> SpatialScores:
    """Per sample, ground-truth boxes (box at t1, box at t2) and predicted boxes in the same order, pixels
    xyxy. A sample with fewer predicted boxes than ground-truth boxes is listed as unparseable and its
    missing boxes score IoU 0."""
    if not gt:
        raise ValueError("no ground-truth samples to score")
    ious: list[float] = []
    bad: list[str] = []
    for sid, boxes in gt.items():
        p = list(pred.get(sid) or [])
        if len(p) < len(boxes):
            bad.append(sid)
        for i, g in enumerate(boxes):
            ious.append(box_iou(p[i], g) if i < len(p) else 0.0)
    return SpatialScores(n_samples=len(gt), n_boxes=len(ious), mean_iou=sum(ious) / len(ious),
                         acc_at_05=sum(1 for v in ious if v >= BOX_ACC_IOU) / len(ious), unparseable=bad)


# -- dynamic captioning ---------------------------------------------------------------------------------------
def java_works() -> bool:
    java = shutil.which("java")
    if not java:
        return False
    try:
        return subprocess.run([java, "-version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _simple_tokenize(text: str) -> str:
    """Lower-case words without punctuation: what the PTB tokenizer pass amounts to for these metrics, used
    only when no Java runtime can run Stanford's tokenizer jar."""
    import re

    return " ".join(re.findall(r"[a-z0-9]+(?:'[a-z]+)?", text.lower()))


@dataclasses.dataclass(frozen=True)
class CaptionScores:
    n: int
    metrics: dict[str, float]
    skipped: dict[str, str]  # metric -> why it was not computed
    unparseable: list[str]

    def as_dict(self) -> dict:
        return {"n": self.n, **self.metrics, "skipped": dict(self.skipped), "unparseable": list(self.unparseable)}


def score_captions(refs: Mapping[str, Sequence[str] | str], preds: Mapping[str, str | None],
                   use_java: bool | None = None) -> CaptionScores:
    """Caption metrics over samples keyed by id. ``refs`` holds one or more reference captions per sample; a
    missing or empty prediction scores as an empty caption (a miss) and is listed."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not refs:
        raise ValueError("no reference captions to score")
    java = java_works() if use_java is None else use_java
    bad = [k for k in refs if not (preds.get(k) or "").strip()]
    gts = {k: [v] if isinstance(v, str) else list(v) for k, v in refs.items()}
    # the scorers reject an empty hypothesis list; an empty caption becomes a lone unmatched token
    res = {k: [(preds.get(k) or "").strip()] for k in refs}
    skipped: dict[str, str] = {"SPICE": "needs Stanford CoreNLP models downloaded at run time"}
    if java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        tok = PTBTokenizer()
        gts_t = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
        res_t = tok.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
    else:
        gts_t = {k: [_simple_tokenize(c) for c in v] for k, v in gts.items()}
        res_t = {k: [_simple_tokenize(c) for c in v] for k, v in res.items()}
        skipped["METEOR"] = "no working Java runtime"
    res_t = {k: [v[0] if v[0].strip() else "<empty>"] for k, v in res_t.items()}
    metrics: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
    metrics.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
    metrics["ROUGE-L"] = float(Rouge().compute_score(gts_t, res_t)[0])
    metrics["CIDEr"] = float(Cider().compute_score(gts_t, res_t)[0])
    if java:
        from pycocoevalcap.meteor.meteor import Meteor

        metrics["METEOR"] = float(Meteor().compute_score(gts_t, res_t)[0])  # the jar exits with the scorer
    return CaptionScores(n=len(refs), metrics=metrics, skipped=skipped, unparseable=bad)


# -- Charades-STA ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GroundingQuery:
    query_id: str
    video_id: str
    start_s: float
    end_s: float
    sentence: str


def read_charades_sta(path: str | Path) -> list[GroundingQuery]:
    """Charades-STA-style annotations: ``<video id> <start s> <end s>##<sentence>`` per line. Query ids are
    ``<video id>#<line number>`` so two sentences about one video stay apart."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            head, sep, sentence = line.partition("##")
            parts = head.split()
            if not sep or len(parts) != 3:
                raise ValueError(f"{path}: line {n} is not 'VID START END##SENTENCE': {line[:80]!r}")
            try:
                start, end = float(parts[1]), float(parts[2])
            except ValueError:
                raise ValueError(f"{path}: line {n}: start/end are not numbers: {line[:80]!r}") from None
            if end < start:
                raise ValueError(f"{path}: line {n}: end {end} before start {start}")
            out.append(GroundingQuery(f"{parts[0]}#{n}", parts[0], start, end, sentence.strip()))
    return out


def charades_gt(queries: Iterable[GroundingQuery]) -> dict[str, tuple[float, float]]:
    return {q.query_id: (q.start_s, q.end_s) for q in queries}


__all__ = [
    "CaptionScores", "GroundingQuery", "IOU_THRESHOLDS", "SpatialScores", "TemporalScores", "charades_gt",
    "java_works", "parse_time_span", "parse_two_boxes", "read_charades_sta", "score_captions", "score_spatial",
    "score_temporal", "temporal_iou",
]
