"""RAM++ expert: released-layout state dict, strict loading, tiny end-to-end tagging, batching."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from experts.base import WeightsNotFoundError, clear_expert_cache, get_expert
from experts.ram_plus import (
    DEFAULT_TAG_THRESHOLD,
    TAG_LIST_FILE,
    TAG_THRESHOLD_FILE,
    CheckpointMismatchError,
    RamPlusConfig,
    RamPlusSpec,
    TagScore,
    VocabularyNotFoundError,
    build_ram_plus_model,
    load_ram_plus,
    official_state_dict_shapes,
)
from experts.ram_plus.__main__ import main as cli_main
from experts.ram_plus.loading import PACKAGED_VOCAB_DIR, load_vocabulary
from experts.ram_plus.swin import SHIFT_MASK_VALUE, relative_position_index, shifted_window_mask
from experts.ram_plus.tiny import TINY_CHECKPOINT_FILE, TINY_TAGS, build_tiny_ram_plus
from tests._ram_plus_layout import TINY, Geometry, official_layout, random_official_state_dict

SNAPSHOT = Path(__file__).parent / "snapshots" / "ram_plus_swin_l_384_state_dict.json"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ram_plus_tiny")
    build_tiny_ram_plus(d)
    return d


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_ram_plus(RamPlusSpec(model_id=str(tiny_dir), variant="tiny", device="cpu"))


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [(48, 64), (120, 90), (64, 64), (33, 200), (80, 80), (17, 31)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


def _copy_checkpoint_dir(src: Path, dst: Path, state: dict | None = None, *, thresholds: bool = True) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / TAG_LIST_FILE, dst / TAG_LIST_FILE)
    if thresholds:
        shutil.copy(src / TAG_THRESHOLD_FILE, dst / TAG_THRESHOLD_FILE)
    if state is None:
        shutil.copy(src / TINY_CHECKPOINT_FILE, dst / TINY_CHECKPOINT_FILE)
    else:
        torch.save({"model": state}, dst / TINY_CHECKPOINT_FILE)
    return dst


def _tiny_state(tiny_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(tiny_dir / TINY_CHECKPOINT_FILE, map_location="cpu", weights_only=True)["model"]


# --- released configuration -------------------------------------------------------------------------


def _as_lists(layout: dict) -> dict:
    return {k: list(v) for k, v in layout.items()}


def test_snapshot_is_the_hand_written_reference_layout():
    """The snapshot file is the hand-written description (tests/_ram_plus_layout.py), not our model's output."""
    assert json.loads(SNAPSHOT.read_text()) == _as_lists(official_layout(Geometry.released("swin_l", 384)))


@pytest.mark.parametrize("variant,size", [("swin_l", 384), ("swin_l", 224), ("swin_b", 384), ("swin_b", 224)])
def test_model_state_dict_equals_reference_layout(variant, size):
    ours = official_state_dict_shapes(variant, size)
    reference = _as_lists(official_layout(Geometry.released(variant, size)))
    assert sorted(set(ours) - set(reference)) == [] and sorted(set(reference) - set(ours)) == []
    assert ours == reference


def test_tiny_variant_has_the_reference_layout_at_miniature_size():
    assert official_state_dict_shapes("tiny") == _as_lists(official_layout(TINY))


def test_official_layout_matches_reference_facts():
    """A few entries spelled out, as cross-checks of the hand-written description itself."""
    s = official_layout(Geometry.released("swin_l", 384))
    assert s["label_embed"] == (4585 * 51, 512)
    assert s["reweight_scale"] == ()  # nn.Parameter(torch.ones([]) * log(1/0.07)) in ram_plus.py
    assert "logit_scale" not in s
    assert s["visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"] == (23 * 23, 6)
    assert s["visual_encoder.layers.2.downsample.reduction.weight"] == (1536, 3072)
    assert "visual_encoder.layers.3.downsample.reduction.weight" not in s
    assert s["image_proj.weight"] == (512, 1536)
    assert s["tagging_head.encoder.layer.1.crossattention.self.key.weight"] == (768, 512)
    assert not any(k.startswith("tagging_head.embeddings") or ".attention." in k or "pooler" in k for k in s)
    masks = {k: v for k, v in s.items() if k.endswith("attn_mask")}
    assert set(masks) == {f"visual_encoder.layers.{i}.blocks.1.attn_mask" for i in (0, 1)} | {
        f"visual_encoder.layers.2.blocks.{j}.attn_mask" for j in range(1, 18, 2)}
    assert masks["visual_encoder.layers.0.blocks.1.attn_mask"] == (64, 144, 144)
    assert masks["visual_encoder.layers.2.blocks.17.attn_mask"] == (4, 144, 144)
    assert sum(k.endswith("relative_position_index") for k in s) == 24
    assert len(s) == 402


def test_cli_prints_state_dict_shapes(capsys):
    assert cli_main(["--print-state-dict-shapes"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(SNAPSHOT.read_text())
    assert cli_main(["--print-state-dict-shapes", "--variant", "swin_b"]) == 0
    swin_b = json.loads(capsys.readouterr().out)
    assert swin_b["image_proj.weight"] == [512, 1024]
    assert swin_b["visual_encoder.layers.0.blocks.0.attn.relative_position_bias_table"] == [529, 4]


# --- geometry helpers ---------------------------------------------------------------------------------


def test_relative_position_index_matches_definition():
    w = 3
    idx = relative_position_index(w)
    coords = [(y, x) for y in range(w) for x in range(w)]
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            assert idx[i, j] == (yi - yj + w - 1) * (2 * w - 1) + (xi - xj + w - 1)


def test_shifted_window_mask_separates_regions():
    mask = shifted_window_mask(8, 8, window=4, shift=2)
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask[0] == 0)  # the top-left window is one region
    last = mask[3]  # bottom-right window holds four regions of 2x2 tokens each
    assert torch.all(torch.diagonal(last) == 0)
    assert last[0, 3] == SHIFT_MASK_VALUE and last[0, 1] == 0  # (0,0)-(0,3) differ; (0,0)-(0,1) same


def test_reweighting_equals_per_tag_softmax(tiny):
    model = tiny.model
    cfg = model.config
    cls = torch.randn(2, cfg.text_embed_dim)
    got = model.reweighted_label_queries(cls)
    scale = math.exp(float(model.reweight_scale))
    assert scale == pytest.approx(1 / 0.07)  # the tiny checkpoint stores the reference initial value
    emb = model.label_embed.view(cfg.num_tags, cfg.descriptions_per_tag, -1)
    for b in range(2):
        c = cls[b] / cls[b].norm()
        for k in (0, 5, cfg.num_tags - 1):
            w = torch.softmax(scale * emb[k] @ c, dim=0)
            torch.testing.assert_close(got[b, k], (w[:, None] * emb[k]).sum(0), rtol=1e-5, atol=1e-6)


# --- tiny end to end ----------------------------------------------------------------------------------


def test_tiny_tags_end_to_end_through_tiny_scheme(tmp_path, monkeypatch):
    monkeypatch.setenv("MOTIONFORGE_TINY_CACHE", str(tmp_path / "cache"))
    spec = RamPlusSpec(model_id="tiny://ram_plus", device="cpu")
    assert spec.variant == "tiny" and spec.image_size == 64
    clear_expert_cache()
    try:
        tagger = get_expert(spec, load_ram_plus)
        assert get_expert(spec, load_ram_plus) is tagger
    finally:
        clear_expert_cache()
    assert tagger.tags == TINY_TAGS
    images = _images(3)
    results = tagger.tag(images)
    scores = tagger.scores(images)
    assert scores.shape == (3, len(TINY_TAGS)) and scores.dtype == np.float32
    assert np.all((scores >= 0) & (scores <= 1))
    assert len(results) == 3 and any(results)
    for row, tags in zip(scores, results):
        assert all(isinstance(t, TagScore) and isinstance(t.score, float) for t in tags)
        assert [t.score for t in tags] == sorted((t.score for t in tags), reverse=True)
        expected = {TINY_TAGS[j] for j in np.flatnonzero(row > tagger.thresholds)}
        assert {t.tag for t in tags} == expected
        for t in tags:
            j = TINY_TAGS.index(t.tag)
            assert t.score == pytest.approx(float(row[j])) and t.score > tagger.thresholds[j]


def test_batching_equivalence(tiny):
    images = _images(5, seed=1)
    batched = tiny.scores(images, batch_size=4)
    single = np.concatenate([tiny.scores([img]) for img in images])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-5)
    assert [[t.tag for t in r] for r in tiny.tag(images, batch_size=5)] == \
        [[t.tag for t in tiny.tag([img])[0]] for img in images]


def test_empty_input_and_bad_images(tiny):
    assert tiny.tag([]) == []
    assert tiny.scores([]).shape == (0, len(TINY_TAGS))
    with pytest.raises(ValueError, match="image 1: .*HxWx3 uint8"):
        tiny.tag([_images(1)[0], np.zeros((10, 10, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="image 0"):
        tiny.tag([np.zeros((10, 10), dtype=np.uint8)])


def test_bf16_runs_and_returns_float32_scores(tiny_dir, tiny):
    t16 = load_ram_plus(RamPlusSpec(model_id=str(tiny_dir), variant="tiny", device="cpu", dtype="bf16"))
    assert next(t16.model.parameters()).dtype == torch.bfloat16
    images = _images(2)
    s16 = t16.scores(images)
    assert s16.dtype == np.float32
    np.testing.assert_allclose(s16, tiny.scores(images), atol=0.1)


# --- strict loading and clear errors ------------------------------------------------------------------


@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_strict_loading_rejects_mismatched_state_dict(tiny_dir, tmp_path, change):
    state = _tiny_state(tiny_dir)
    if change == "missing":
        key = "tagging_head.encoder.layer.1.output.LayerNorm.bias"
        del state[key]
    elif change == "extra":
        key = "tagging_head.embeddings.word_embeddings.weight"
        state[key] = torch.zeros(4, 32)
    else:
        key = "image_proj.weight"
        state[key] = torch.zeros(16, 32)
    d = _copy_checkpoint_dir(tiny_dir, tmp_path / "ckpt", state)
    with pytest.raises(CheckpointMismatchError, match=key.replace(".", r"\.")):
        load_ram_plus(RamPlusSpec(model_id=str(d), variant="tiny", device="cpu"))


def test_module_level_strict_load_rejects_missing_and_extra_keys(tiny_dir):
    model = build_ram_plus_model(RamPlusConfig.for_variant("tiny"))
    state = _tiny_state(tiny_dir)
    model.load_state_dict(state, strict=True)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in state.items() if k != "fc.bias"}, strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict({**state, "logit_scale": torch.tensor(1.0)}, strict=True)


def test_wrong_variant_is_reported(tiny_dir):
    with pytest.raises(CheckpointMismatchError, match="variant"):
        load_ram_plus(RamPlusSpec(model_id=str(tiny_dir), variant="swin_b", image_size=224, device="cpu"))


def test_accepts_bare_state_dict_and_legacy_head_name(tiny_dir, tmp_path, tiny):
    state = _tiny_state(tiny_dir)
    legacy = {k.replace("tagging_head.", "vision_multi.", 1): v for k, v in state.items()}
    legacy["reweight_scale"] = legacy["reweight_scale"].reshape(1)
    d = _copy_checkpoint_dir(tiny_dir, tmp_path / "legacy", None)
    torch.save(legacy, d / TINY_CHECKPOINT_FILE)
    tagger = load_ram_plus(RamPlusSpec(model_id=str(d / TINY_CHECKPOINT_FILE), variant="tiny", device="cpu"))
    images = _images(2)
    np.testing.assert_allclose(tagger.scores(images), tiny.scores(images), rtol=1e-6, atol=1e-6)


def test_missing_checkpoint_raises_weights_not_found(tmp_path, monkeypatch):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_ram_plus(RamPlusSpec(model_id=str(tmp_path / "nope" / "ram_plus_swin_large_14m.pth")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsNotFoundError, match="ram_plus_swin_large_14m.pth"):
        load_ram_plus(RamPlusSpec(model_id=str(tmp_path / "empty")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MOTIONFORGE_WEIGHTS", raising=False)
    with pytest.raises(WeightsNotFoundError, match="xinyu1205/recognize-anything-plus-model.*--profile tiny"):
        load_ram_plus(RamPlusSpec())


def test_missing_vocabulary_names_the_files(tiny_dir, tmp_path):
    d = tmp_path / "novocab"
    d.mkdir()
    shutil.copy(tiny_dir / TINY_CHECKPOINT_FILE, d / TINY_CHECKPOINT_FILE)
    # No tag list beside the checkpoint: the shipped 4,585-tag list is used, which does not fit 24 tags.
    with pytest.raises(CheckpointMismatchError, match="4585 tags"):
        load_ram_plus(RamPlusSpec(model_id=str(d), variant="tiny", device="cpu"))
    with pytest.raises(VocabularyNotFoundError, match=f"vocab_dir.*{TAG_LIST_FILE}.*{TAG_THRESHOLD_FILE}"):
        load_ram_plus(RamPlusSpec(model_id=str(d), vocab_dir=str(tmp_path / "nothing"), variant="tiny",
                                  device="cpu"))
    # vocab_dir points elsewhere
    tagger = load_ram_plus(RamPlusSpec(model_id=str(d), vocab_dir=str(tiny_dir), variant="tiny", device="cpu"))
    assert tagger.tags == TINY_TAGS


def test_default_threshold_when_threshold_file_absent_or_short(tiny_dir, tmp_path):
    d = _copy_checkpoint_dir(tiny_dir, tmp_path / "nothr", thresholds=False)
    tagger = load_ram_plus(RamPlusSpec(model_id=str(d), variant="tiny", device="cpu"))
    assert np.all(tagger.thresholds == np.float32(DEFAULT_TAG_THRESHOLD))
    (d / TAG_THRESHOLD_FILE).write_text("0.5\n0.75\n")
    tagger = load_ram_plus(RamPlusSpec(model_id=str(d), variant="tiny", device="cpu"))
    assert tagger.thresholds[:3].tolist() == pytest.approx([0.5, 0.75, DEFAULT_TAG_THRESHOLD])
    (d / TAG_THRESHOLD_FILE).write_text("0.5\nhigh\n")
    with pytest.raises(VocabularyNotFoundError, match="line 2"):
        load_ram_plus(RamPlusSpec(model_id=str(d), variant="tiny", device="cpu"))


def test_tag_list_that_does_not_fit_the_checkpoint(tiny_dir, tmp_path):
    d = _copy_checkpoint_dir(tiny_dir, tmp_path / "badvocab", thresholds=False)
    (d / TAG_LIST_FILE).write_text("\n".join(TINY_TAGS[:5]) + "\n")
    with pytest.raises(CheckpointMismatchError, match="does not belong to this checkpoint"):
        load_ram_plus(RamPlusSpec(model_id=str(d), variant="tiny", device="cpu"))


# --- the released vocabulary ships with the package --------------------------------------------------


def test_shipped_vocabulary_is_the_released_one():
    tags, thresholds = load_vocabulary(PACKAGED_VOCAB_DIR)
    assert len(tags) == len(thresholds) == 4585
    assert len(set(tags)) == 4585
    # first and last lines of ram/data/ram_tag_list.txt at recognize-anything 7cb804a
    assert tags[:3] == ["3D CG rendering", "3D glasses", "abacus"]
    assert all(0 < t <= 1 for t in thresholds) and min(thresholds) < max(thresholds)
    license_text = (PACKAGED_VOCAB_DIR / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert "recognize-anything" in (PACKAGED_VOCAB_DIR / "NOTICE").read_text()
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"experts.ram_plus" = ["data/*.txt", "data/LICENSE", "data/NOTICE"]' in pyproject


# --- checkpoints in the reference layout --------------------------------------------------------------


def _reference_checkpoint_dir(tmp_path: Path, state: dict, name: str = "ref") -> Path:
    """A checkpoint folder holding ``state`` plus the tiny vocabulary (24 tags)."""
    d = tmp_path / name
    d.mkdir(parents=True, exist_ok=True)
    (d / TAG_LIST_FILE).write_text("\n".join(TINY_TAGS) + "\n", encoding="utf-8")
    torch.save({"model": state}, d / "ram_plus_reference_layout.pth")
    return d


def test_reference_layout_checkpoint_loads_strictly_with_its_reweight_scale(tmp_path, caplog):
    state = random_official_state_dict(TINY, seed=3, reweight_scale=1.25)
    d = _reference_checkpoint_dir(tmp_path, state)
    with caplog.at_level(logging.INFO, logger="experts.ram_plus.loading"):
        tagger = load_ram_plus(RamPlusSpec(model_id=str(d), variant="tiny", device="cpu"))
    assert caplog.records == []  # the official layout needs no adjustment
    assert float(tagger.model.reweight_scale) == pytest.approx(1.25)
    loaded = tagger.model.state_dict()
    for key, value in state.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue  # geometry buffers are recomputed, not trusted
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    # the trained temperature matters: the reference initial value gives other scores
    images = _images(2)
    scores = tagger.scores(images)
    assert np.isfinite(scores).all()
    with torch.no_grad():
        tagger.model.reweight_scale.fill_(math.log(1 / 0.07))
    assert np.abs(tagger.scores(images) - scores).max() > 1e-4


def test_variant_with_extra_logit_scale_is_accepted_with_a_note(tmp_path, caplog):
    state = random_official_state_dict(TINY, seed=4, reweight_scale=2.0)
    state["logit_scale"] = torch.tensor([4.6052])
    d = _reference_checkpoint_dir(tmp_path, state)
    with caplog.at_level(logging.INFO, logger="experts.ram_plus.loading"):
        tagger = load_ram_plus(RamPlusSpec(model_id=str(d), variant="tiny", device="cpu"))
    assert "logit_scale" in caplog.text and "dropped" in caplog.text
    assert float(tagger.model.reweight_scale) == pytest.approx(2.0)
    assert "logit_scale" not in tagger.model.state_dict()


def test_variant_without_reweight_scale_uses_the_reference_initial_value(tmp_path, caplog):
    state = random_official_state_dict(TINY, seed=5)
    del state["reweight_scale"]
    d = _reference_checkpoint_dir(tmp_path, state)
    with caplog.at_level(logging.INFO, logger="experts.ram_plus.loading"):
        tagger = load_ram_plus(RamPlusSpec(model_id=str(d), variant="tiny", device="cpu"))
    assert "reweight_scale" in caplog.text and "log(1/0.07)" in caplog.text
    assert float(tagger.model.reweight_scale) == pytest.approx(math.log(1 / 0.07))


@pytest.mark.parametrize("change", ["unexpected", "missing", "both"])
def test_any_other_difference_is_refused_naming_the_keys(tmp_path, change):
    state = random_official_state_dict(TINY, seed=6)
    missing_key = "tagging_head.encoder.layer.0.crossattention.output.LayerNorm.weight"
    extra_key = "tagging_head.embeddings.word_embeddings.weight"
    if change in ("missing", "both"):
        del state[missing_key]
    if change in ("unexpected", "both"):
        state[extra_key] = torch.zeros(8, 32)
    d = _reference_checkpoint_dir(tmp_path, state)
    with pytest.raises(CheckpointMismatchError) as info:
        load_ram_plus(RamPlusSpec(model_id=str(d), variant="tiny", device="cpu"))
    msg = str(info.value)
    assert ("missing keys 'tagging_head.encoder.layer.0.crossattention.output.LayerNorm.weight'" in msg) \
        == (change != "unexpected")
    assert ("unexpected keys 'tagging_head.embeddings.word_embeddings.weight'" in msg) == (change != "missing")
    assert "variant" in msg  # says what to check
