"""experts.clip: tiny open_clip model through the production loading path, scores, tagger, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experts.base import WeightsNotFoundError, get_expert
from experts.clip import Clip, ClipSpec, ClipTagger, load_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Clip:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOTIONFORGE_TINY_CACHE", str(tmp_path_factory.mktemp("tiny")))
        yield load_clip(ClipSpec(model_id="tiny://clip", device="cpu"))


def _images(seed: int, shapes) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]


SHAPES = [(40, 60), (32, 32), (100, 20), (7, 9), (64, 48)]


def test_defaults_follow_the_paper():
    spec = ClipSpec()
    assert (spec.arch, spec.model_id) == ("ViT-B-32", "openai")


def test_tiny_weights_come_from_disk(clip):
    from safetensors.torch import load_file

    from experts.base import tiny_cache_dir

    saved = load_file(str(tiny_cache_dir() / "clip" / "open_clip_model.safetensors"))
    state = clip.model.state_dict()
    assert set(saved) == set(state)
    for name, tensor in saved.items():
        torch.testing.assert_close(state[name], tensor)
    assert not clip.model.training


def test_embeddings_shapes_norms_and_batching(clip):
    images = _images(0, SHAPES)
    emb = clip.encode_images(images, batch_size=2)
    assert emb.shape == (5, clip.embed_dim) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    singles = np.concatenate([clip.encode_images([img]) for img in images])
    np.testing.assert_allclose(emb, singles, atol=1e-5)
    texts = Clip.prompts(["dog", "cat", "red car"])
    assert texts[0] == "a photo of a dog."
    t = clip.encode_texts(texts, batch_size=2)
    np.testing.assert_allclose(t, np.concatenate([clip.encode_texts([x]) for x in texts]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)
    assert clip.encode_images([]).shape == (0, clip.embed_dim)


def test_scores_are_consistent(clip):
    images = _images(1, SHAPES[:3])
    texts = ["a dog", "a cat", "a dog"]
    pairs = clip.score_pairs(images, texts)
    full = clip.score_texts(images, texts)
    assert pairs.shape == (3,) and full.shape == (3, 3)
    np.testing.assert_allclose(pairs, np.diag(full), atol=1e-5)
    assert np.all(np.abs(full) <= 1.0 + 1e-5)
    probs = clip.probs(images, ["a dog", "a cat"])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    logits = clip.logit_scale * clip.score_texts(images, ["a dog", "a cat"])
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits), dim=1).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="one text per image"):
        clip.score_pairs(images, texts[:2])
    with pytest.raises(ValueError, match="image 0 must be an HxWx3 uint8"):
        clip.encode_images([np.zeros((4, 4, 3), np.float32)])


def test_tagger_caches_vocabulary_and_ranks(clip, monkeypatch):
    vocab = ["dog", "cat", "car", "tree", "person"]
    tagger = ClipTagger(clip, vocab, threshold=-1.0, top_k=3)
    calls = []
    monkeypatch.setattr(clip, "encode_texts", lambda *a, **k: calls.append(a) or np.zeros(0))
    images = _images(2, SHAPES[:2])
    tags = tagger.tag(images)
    assert calls == []  # vocabulary embeddings were computed once, in the constructor
    monkeypatch.undo()
    expected = clip.score_texts(images, Clip.prompts(vocab))
    for row, got in zip(expected, tags):
        assert len(got) == 3
        assert [t for t, _ in got] == [vocab[j] for j in np.argsort(-row)[:3]]
        np.testing.assert_allclose([s for _, s in got], np.sort(row)[::-1][:3], atol=1e-5)
    # A threshold between scores cuts the list.
    cut = float(np.sort(expected[0])[::-1][1])
    strict = ClipTagger(clip, vocab, threshold=cut, top_k=5).tag(images[:1])[0]
    assert len(strict) == 2
    soft = ClipTagger(clip, vocab, threshold=0.0, top_k=5, score="softmax").tag(images[:1])[0]
    assert sum(s for _, s in soft) == pytest.approx(1.0, abs=1e-4)


def test_get_expert_loads_once(clip):
    from experts.base import clear_expert_cache

    spec = ClipSpec(model_id="tiny://clip", device="cpu")
    try:
        assert get_expert(spec, load_clip) is get_expert(spec, load_clip)
    finally:
        clear_expert_cache()


def test_missing_weights_name_the_model(monkeypatch, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="/nonexistent/clip.pt"):
        load_clip(ClipSpec(model_id="/nonexistent/clip.pt", device="cpu"))
    with pytest.raises(ValueError, match="not a local checkpoint.*known tags: openai"):
        load_clip(ClipSpec(model_id="no-such-tag", device="cpu"))
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("MOTIONFORGE_WEIGHTS", raising=False)
    for model_id, named in [("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "laion/CLIP-ViT-B-32"),
                            ("openai", "ViT-B-32/openai")]:
        with pytest.raises(WeightsNotFoundError, match=named) as info:
            load_clip(ClipSpec(model_id=model_id, device="cpu"))
        assert "--profile tiny" in str(info.value)
