"""experts.grounding_dino: tiny model through the production loading path, label mapping, batching, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experts.base import WeightsNotFoundError
from experts.grounding_dino import (Detection, GroundingDino, GroundingDinoSpec, _decode, _label_tokens,
                                    build_prompt, load_grounding_dino, normalise_label)

ALL = dict(box_threshold=0.0, text_threshold=0.0)  # a random-init model: keep everything to exercise mapping


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOTIONFORGE_TINY_CACHE", str(tmp_path_factory.mktemp("tiny")))
        yield


@pytest.fixture(scope="module")
def gd(tiny_dir) -> GroundingDino:
    return load_grounding_dino(GroundingDinoSpec(model_id="tiny://grounding_dino", device="cpu"))


def _images(seed: int, shapes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]


def test_prompt_format_and_spans():
    prompt, spans = build_prompt([normalise_label(x) for x in ["Cat", " traffic  Light. "]])
    assert prompt == "cat. traffic light."
    assert [prompt[a:b] for a, b in spans] == ["cat", "traffic light"]


def test_tiny_checkpoint_loads_through_production_path(gd):
    from safetensors.torch import load_file

    from experts.base import tiny_cache_dir

    assert GroundingDinoSpec().model_id == "IDEA-Research/grounding-dino-base"
    assert type(gd.model).__name__ == "GroundingDinoForObjectDetection" and not gd.model.training
    saved = load_file(str(tiny_cache_dir() / "grounding_dino" / "model.safetensors"))
    state = gd.model.state_dict()
    common = [name for name in saved if name in state]  # transformers 5 may rename a few keys on load
    assert len(common) > len(saved) // 2
    for name in common:
        torch.testing.assert_close(state[name], saved[name])  # weights came from disk, not a fresh init
    # The saved tokenizer knows common object words (not all [UNK]; transformers-5 vocab_file pitfall).
    ids = gd.tokenizer("person. dog. traffic light.", add_special_tokens=False)["input_ids"]
    assert gd.tokenizer.unk_token_id not in ids
    assert gd.tokenizer.unk_token_id not in gd.tokenizer("xylophone.", add_special_tokens=False)["input_ids"]


def test_detect_types_ranges_and_label_mapping(gd):
    images = _images(0, [(60, 80), (60, 80), (50, 70)])
    labels = [["Cat", "dog"], ["red ball."], []]
    out = gd.detect(images, labels, **ALL)
    assert len(out) == 3 and out[2] == []
    for img, requested, dets in zip(images, labels, out):
        h, w = img.shape[:2]
        assert all(isinstance(d, Detection) for d in dets)
        assert [d.score for d in dets] == sorted((d.score for d in dets), reverse=True)
        for d in dets:
            assert d.label in requested  # caller's spelling, exactly one requested label
            assert 0.0 <= d.score <= 1.0
            x0, y0, x1, y1 = d.box_xyxy_px
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert len(out[0]) > 0 and {d.label for d in out[1]} == {"red ball."}
    # Thresholds filter: nothing clears a box score above 1.
    assert gd.detect(images[:1], labels[:1], box_threshold=1.0) == [[]]


def test_batch_equals_single_calls(gd):
    images = _images(1, [(60, 80), (48, 64), (60, 80), (60, 80), (48, 64)])
    labels = [["cat", "dog"], ["person"], ["car", "traffic light", "dog"], ["cat"], ["bus", "person"]]
    batched = gd.detect(images, labels, batch_size=3, **ALL)
    singles = [gd.detect([img], [ls], **ALL)[0] for img, ls in zip(images, labels)]
    for b, s in zip(batched, singles):
        assert [d.label for d in b] == [d.label for d in s]
        np.testing.assert_allclose([d.score for d in b], [d.score for d in s], atol=1e-4)
        np.testing.assert_allclose([d.box_xyxy_px for d in b], [d.box_xyxy_px for d in s], atol=1e-2)


def test_long_label_lists_are_split_into_prompts(gd):
    images = _images(2, [(60, 80)])
    labels = ["cat", "dog", "person", "car", "bus", "tree"]
    whole = gd.detect(images, [labels], **ALL)[0]
    gd_small = GroundingDino(gd.model, gd.processor, gd.spec)
    gd_small.max_text_len = 6  # [CLS] + [SEP] + 2 x (word, "."): three prompts of two labels
    assert len(gd_small._chunks(labels)) == 3
    split = gd_small.detect(images, [labels], **ALL)[0]
    parts = [d for i in range(0, 6, 2) for d in gd.detect(images, [labels[i:i + 2]], **ALL)[0]]
    assert sorted((d.label, round(d.score, 4)) for d in split) == sorted((d.label, round(d.score, 4)) for d in parts)
    assert {d.label for d in split} <= set(labels) and whole


def test_query_mapped_to_best_label_tokens():
    # Prompt "cat. traffic light." -> [CLS] cat . traffic light . [SEP]
    prompt, spans = build_prompt(["cat", "traffic light"])
    offsets = torch.tensor([(0, 0), (0, 3), (3, 4), (5, 12), (13, 18), (18, 19), (0, 0)])
    tokens = _label_tokens(offsets, torch.ones(7, dtype=torch.long), spans)
    assert tokens == [[1], [3, 4]]
    probs = torch.zeros(4, 7)
    probs[0, 4] = 0.9  # the "light" piece of the two-word label
    probs[1, 1] = 0.8  # "cat"
    probs[2, 2] = 0.95  # only the separator: matches no label
    probs[3, 3] = 0.3  # weak "traffic": kept by box threshold 0.2, dropped by text threshold 0.35 below
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.95, 0.5, 0.3, 0.4], [0.5, 0.5, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]])
    dets = _decode(probs, boxes, tokens, ["Cat", "Traffic Light"], 100, 50, box_threshold=0.2, text_threshold=0.25)
    expected = [("Traffic Light", 0.9), ("Cat", 0.8), ("Traffic Light", 0.3)]
    assert [(d.label, round(d.score, 2)) for d in dets] == expected
    assert dets[1].box_xyxy_px == pytest.approx((80.0, 15.0, 100.0, 35.0))  # clipped at the right edge
    strict = _decode(probs, boxes, tokens, ["Cat", "Traffic Light"], 100, 50, box_threshold=0.2, text_threshold=0.35)
    assert [d.label for d in strict] == ["Traffic Light", "Cat"]


def test_bad_inputs(gd):
    with pytest.raises(ValueError, match="label lists"):
        gd.detect(_images(0, [(60, 80)]), [["cat"], ["dog"]])
    with pytest.raises(ValueError, match="image 0 must be an HxWx3 uint8"):
        gd.detect([np.zeros((60, 80), np.uint8)], [["cat"]])


def test_mm_grounding_dino_option(tiny_dir):
    spec = GroundingDinoSpec(model_id="tiny://mm_grounding_dino", architecture="mm_grounding_dino", device="cpu")
    mm = load_grounding_dino(spec)
    assert type(mm.model).__name__ == "MMGroundingDinoForObjectDetection"
    dets = mm.detect(_images(3, [(60, 80)]), [["cat", "dog"]], **ALL)[0]
    assert dets and {d.label for d in dets} <= {"cat", "dog"}


def test_missing_weights_name_the_model(monkeypatch, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="/nonexistent/gdino"):
        load_grounding_dino(GroundingDinoSpec(model_id="/nonexistent/gdino", device="cpu"))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("MOTIONFORGE_WEIGHTS", raising=False)
    with pytest.raises(WeightsNotFoundError, match="IDEA-Research/grounding-dino-tiny") as info:
        load_grounding_dino(GroundingDinoSpec(model_id="IDEA-Research/grounding-dino-tiny", device="cpu"))
    assert "--profile tiny" in str(info.value)
