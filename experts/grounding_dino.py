"""Open-vocabulary box detector: Grounding DINO (and MM-Grounding-DINO) through transformers.

Construction (``build_grounding_dino``), loading (``load_grounding_dino``) and inference
(``GroundingDino.detect``) are separate. groundingdino-py is not used: it cannot run on transformers 5
(ENVIRONMENT.md).

Prompts follow the reference release: lower-case labels joined as ``"cat. dog."``. Each kept query is
assigned to exactly one requested label: the label whose tokens carry the highest probability for that
query, so a multi-word or sub-word-split label ("traffic light", "skateboarder" -> "skate ##board ##er")
is matched as a whole, and a query that only lights up separators or special tokens is dropped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from experts.base import ModelSpec, hf_load, inference_mode, register_tiny, resolve_device, resolve_dtype

DEFAULT_MODEL_ID = "IDEA-Research/grounding-dino-base"


class GroundingDinoSpec(ModelSpec):
    """``architecture`` picks the transformers class: the original Grounding DINO or MM-Grounding-DINO."""

    model_id: str = DEFAULT_MODEL_ID
    architecture: Literal["grounding_dino", "mm_grounding_dino"] = "grounding_dino"


@dataclass(frozen=True)
class Detection:
    """One box: the requested label it answers, its score in [0, 1], pixel xyxy clipped to the image."""

    label: str
    score: float
    box_xyxy_px: tuple[float, float, float, float]


def normalise_label(label: str) -> str:
    """Lower-case, single-spaced, without the trailing '.' that separates phrases in a prompt."""
    return re.sub(r"\s+", " ", label.strip().lower()).strip(" .")


def build_prompt(labels: Sequence[str]) -> tuple[str, list[tuple[int, int]]]:
    """``(["cat", "red ball"]) -> ("cat. red ball.", [(0, 3), (5, 13)])``: prompt and each label's char span."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for label in labels:
        spans.append((pos, pos + len(label)))
        parts.append(label + ".")
        pos += len(label) + 2  # label, ".", " "
    return " ".join(parts), spans


def _model_class(architecture: str):
    if architecture == "mm_grounding_dino":
        from transformers import MMGroundingDinoForObjectDetection

        return MMGroundingDinoForObjectDetection
    from transformers import GroundingDinoForObjectDetection

    return GroundingDinoForObjectDetection


def build_grounding_dino(config: Any, architecture: str = "grounding_dino"):
    """Construction only: a randomly initialised model from a transformers config (no weights)."""
    return _model_class(architecture)(config)


@dataclass(frozen=True)
class _Item:
    image_index: int
    labels: tuple[str, ...]  # normalised labels of this prompt chunk
    originals: tuple[str, ...]  # the caller's spelling of each label, returned in Detection.label


class GroundingDino:
    """A loaded detector. Thread-compatible (no per-call state on the instance)."""

    def __init__(self, model: Any, processor: Any, spec: GroundingDinoSpec) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.spec = spec
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.max_text_len = int(getattr(model.config, "max_text_len", 256))

    @property
    def name(self) -> str:
        return f"{self.spec.architecture}:{self.spec.model_id}@{self.spec.revision or 'default'}"

    # --------------------------------------------------------------------------------------- prompts

    def _chunks(self, labels: Sequence[str]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        """Deduplicate labels and split them into prompts that fit the text encoder's token budget."""
        seen: dict[str, str] = {}
        for raw in labels:
            norm = normalise_label(raw)
            if norm and norm not in seen:
                seen[norm] = raw
        budget = self.max_text_len - 2  # [CLS] and [SEP]
        chunks: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
        cur: list[str] = []
        used = 0
        for norm in seen:
            cost = len(self.tokenizer(norm + ".", add_special_tokens=False)["input_ids"])
            if cost > budget:
                raise ValueError(f"label {norm!r} alone needs {cost} tokens, more than the model's "
                                 f"{budget}-token prompt; shorten it")
            if cur and used + cost > budget:
                chunks.append((tuple(cur), tuple(seen[x] for x in cur)))
                cur, used = [], 0
            cur.append(norm)
            used += cost
        if cur:
            chunks.append((tuple(cur), tuple(seen[x] for x in cur)))
        return chunks

    # ------------------------------------------------------------------------------------- inference

    def detect(
        self,
        images: list[np.ndarray],
        labels: list[list[str]],
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        batch_size: int = 8,
    ) -> list[list[Detection]]:
        """Boxes for ``labels[i]`` in ``images[i]`` (HxWx3 uint8 RGB), best score first.

        A query is kept when its best token probability exceeds ``box_threshold`` (the reference
        release's box score, reported as ``score``) and the label it is assigned to has a token above
        ``text_threshold``. Images are batched by size, so no image is padded and a batch gives the same
        boxes as single calls.
        """
        if len(images) != len(labels):
            raise ValueError(f"got {len(images)} images but {len(labels)} label lists; pass one list per image")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for i, img in enumerate(images):
            if not (isinstance(img, np.ndarray) and img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8):
                desc = f"{type(img).__name__} {getattr(img, 'shape', '')} {getattr(img, 'dtype', '')}"
                raise ValueError(f"image {i} must be an HxWx3 uint8 RGB array, got {desc}")
        items = [_Item(i, norm, orig) for i, ls in enumerate(labels) for norm, orig in self._chunks(ls)]
        # Same-size images share a batch: padding would change the backbone's features near the border.
        items.sort(key=lambda it: (images[it.image_index].shape[:2], it.image_index))
        results: list[list[Detection]] = [[] for _ in images]
        start = 0
        while start < len(items):
            shape = images[items[start].image_index].shape[:2]
            stop = start
            while (stop < len(items) and stop - start < batch_size
                   and images[items[stop].image_index].shape[:2] == shape):
                stop += 1
            batch = items[start:stop]
            for item, dets in zip(batch, self._detect_batch(images, batch, box_threshold, text_threshold)):
                results[item.image_index].extend(dets)
            start = stop
        for dets in results:
            dets.sort(key=lambda d: -d.score)
        return results

    @inference_mode
    def _detect_batch(self, images: list[np.ndarray], batch: list[_Item], box_threshold: float,
                      text_threshold: float) -> list[list[Detection]]:
        prompts, spans = zip(*(build_prompt(it.labels) for it in batch))
        text = self.tokenizer(list(prompts), padding="longest", return_tensors="pt", return_offsets_mapping=True)
        offsets = text.pop("offset_mapping")
        pixels = self.image_processor([images[it.image_index] for it in batch], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in {**text, **pixels}.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model(**inputs)
        probs = out.logits.float().sigmoid().cpu()  # (B, queries, max_text_len); -inf beyond the text -> 0
        boxes = out.pred_boxes.float().cpu()  # (B, queries, 4) normalised cx, cy, w, h
        results: list[list[Detection]] = []
        for b, item in enumerate(batch):
            h, w = images[item.image_index].shape[:2]
            token_sets = _label_tokens(offsets[b], text["attention_mask"][b], spans[b])
            results.append(_decode(probs[b], boxes[b], token_sets, item.originals, w, h,
                                   box_threshold, text_threshold))
        return results


def _label_tokens(offsets: Any, mask: Any, spans: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Token positions of each label: tokens whose character offsets fall inside the label's span."""
    out: list[list[int]] = [[] for _ in spans]
    for pos, ((a, b), m) in enumerate(zip(offsets.tolist(), mask.tolist())):
        if not m or b <= a:  # padding and special tokens have empty offsets
            continue
        for j, (s, e) in enumerate(spans):
            if a >= s and b <= e:
                out[j].append(pos)
                break
    return out


def _decode(probs: Any, boxes: Any, token_sets: list[list[int]], labels: Sequence[str], width: int, height: int,
            box_threshold: float, text_threshold: float) -> list[Detection]:
    import torch

    scores = probs.max(dim=-1).values
    keep = torch.nonzero(scores > box_threshold).flatten().tolist()
    if not keep or not any(token_sets):
        return []
    # label_scores[q, j] = best probability over label j's tokens for query q.
    label_scores = torch.stack(
        [probs[:, t].max(dim=-1).values if t else torch.zeros(probs.shape[0]) for t in token_sets], dim=1)
    cx, cy, bw, bh = boxes.unbind(-1)
    xyxy = torch.stack([(cx - bw / 2) * width, (cy - bh / 2) * height, (cx + bw / 2) * width,
                        (cy + bh / 2) * height], dim=-1)
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    dets: list[Detection] = []
    for q in keep:
        j = int(label_scores[q].argmax())
        if float(label_scores[q, j]) <= text_threshold:
            continue  # the query matches none of the requested labels well enough
        x0, y0, x1, y1 = (float(v) for v in xyxy[q])
        if x1 <= x0 or y1 <= y0:
            continue  # entirely outside the image once clipped
        dets.append(Detection(label=labels[j], score=float(scores[q]), box_xyxy_px=(x0, y0, x1, y1)))
    return dets


# ------------------------------------------------------------------------------------------- loading


def load_grounding_dino(spec: GroundingDinoSpec) -> GroundingDino:
    """Load processor and weights (local path, $MOTIONFORGE_WEIGHTS, HF cache, or ``tiny://grounding_dino``)."""
    from transformers import AutoProcessor

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    processor = hf_load(AutoProcessor.from_pretrained, spec.model_id, spec.revision)
    model = hf_load(_model_class(spec.architecture).from_pretrained, spec.model_id, spec.revision, dtype=dtype)
    model.to(device).eval()
    return GroundingDino(model, processor, spec)


# A vocabulary for the tiny checkpoint: common object words (COCO and everyday things) plus single letters
# and '##' letter pieces, so any lower-case word tokenises into known pieces instead of [UNK].
_TINY_WORDS = """
person man woman child boy girl people baby player rider bicycle bike car motorcycle airplane plane bus train
truck boat ship traffic light fire hydrant stop sign parking meter bench bird cat dog horse sheep cow elephant
bear zebra giraffe backpack umbrella handbag tie suitcase frisbee skis snowboard sports ball kite baseball bat
glove skateboard surfboard tennis racket bottle wine glass cup fork knife spoon bowl banana apple sandwich orange
broccoli carrot hot pizza donut cake chair couch potted plant bed dining table toilet tv laptop mouse remote
keyboard cell phone microwave oven toaster sink refrigerator book clock vase scissors teddy hair drier
toothbrush hand arm leg head face foot finger animal vehicle tree grass road street building house wall window
door sky water sea river lake beach sand snow mountain hill rock field floor ground table box bag hat shirt
jacket shoe dress ball toy robot fish duck chicken pig monkey lion tiger rabbit mouse insect flower leaf
camera screen computer pen paper cloud sun moon light lamp car wheel helmet red blue green yellow black white
small big large little the a of and in on with
""".split()


def _write_tiny(out_dir: Path, architecture: str) -> None:
    """Write a random-initialised miniature (0.4 M parameters) of ``architecture`` with its processor."""
    import torch
    from transformers import (AutoTokenizer, BertConfig, BertTokenizer, GroundingDinoConfig,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, MMGroundingDinoConfig, SwinConfig)

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "-", "'"]
    tokens += list(dict.fromkeys(w for w in _TINY_WORDS if w not in tokens))
    tokens += [c for c in letters if c not in tokens] + [f"##{c}" for c in letters]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # An in-memory vocab: BertTokenizer(vocab_file=...) silently maps everything to [UNK] in transformers 5.
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True)
    config_cls = MMGroundingDinoConfig if architecture == "mm_grounding_dino" else GroundingDinoConfig
    config = config_cls(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=7,
                                   out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               vocab_size=len(vocab), max_position_embeddings=256),
        d_model=32, encoder_layers=1, decoder_layers=2,  # decoder_layers=1 breaks weight tying
        encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_n_points=2, decoder_n_points=2, num_queries=30,
    )
    torch.manual_seed(0)
    model = build_grounding_dino(config, architecture)
    # 96 px keeps the coarsest (1/64) feature level at >= 2x2: GroupNorm rejects a 1x1 map.
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 96, "longest_edge": 128})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    # Guard against the transformers-5 pitfall above: the saved tokenizer must know the words.
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    ids = reloaded("cat. dog.", add_special_tokens=False)["input_ids"]
    if ids.count(reloaded.unk_token_id) == len(ids):
        raise RuntimeError(f"tiny Grounding DINO tokenizer in {out_dir} maps every word to [UNK]")


@register_tiny("grounding_dino")
def build_tiny_grounding_dino(out_dir: Path) -> None:
    """``tiny://grounding_dino``: miniature GroundingDinoForObjectDetection."""
    _write_tiny(out_dir, "grounding_dino")


@register_tiny("mm_grounding_dino")
def build_tiny_mm_grounding_dino(out_dir: Path) -> None:
    """``tiny://mm_grounding_dino``: miniature MMGroundingDinoForObjectDetection (use with that architecture)."""
    _write_tiny(out_dir, "mm_grounding_dino")


__all__ = ["Detection", "GroundingDino", "GroundingDinoSpec", "build_grounding_dino", "build_prompt",
           "load_grounding_dino", "normalise_label"]
