"""iMOVE 3.2.2 relative position tokens through the tiny Qwen2-VL tokenizer and the export's codec, both modes."""
from __future__ import annotations

import random

import pytest
import torch

import stages.shared.relative_tokens as codec
from experts.model_parts import ModelPartsConfig, PositionTokensConfig, apply_model_parts


@pytest.fixture()
def tiny():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from experts.base import resolve_tiny

    path = resolve_tiny("tiny://qwen2_vl")
    return AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)


def _sample_text(rng: random.Random, duration_s: float, w: int, h: int):
    t0, t1 = sorted(rng.uniform(0, duration_s) for _ in range(2))
    x1, x2 = sorted(rng.uniform(0, w) for _ in range(2))
    y1, y2 = sorted(rng.uniform(0, h) for _ in range(2))
    qt = [codec.quantize_time(t0, duration_s), codec.quantize_time(t1, duration_s)]
    qb = codec.quantize_box((x1, y1, x2, y2), w, h)
    text = f"The red ball moves from {codec.format_time(qt[0])} to {codec.format_time(qt[1])} at {codec.format_box(qb)}."
    return text, qt, qb, (t0, t1, (x1, y1, x2, y2))


def _round_trip(parts, tok, text: str) -> str:
    ids = tok(parts.to_model_text(text), add_special_tokens=False)["input_ids"]
    return parts.from_model_text(tok.decode(ids, skip_special_tokens=True))


@pytest.mark.parametrize("mode", ["numbers", "tokens"])
def test_values_round_trip_through_tokenizer_and_codec(tiny, mode):
    model, proc = tiny
    parts = apply_model_parts(model, proc, ModelPartsConfig(position_tokens=PositionTokensConfig(mode=mode)), codec)
    rng = random.Random(7)
    for _ in range(40):
        duration, w, h = rng.uniform(1, 60), rng.choice([320, 640, 1280]), rng.choice([240, 272, 720])
        text, qt, qb, (t0, t1, box) = _sample_text(rng, duration, w, h)
        back = _round_trip(parts, proc.tokenizer, text)
        assert back == text
        assert codec.parse_times(back) == qt and codec.parse_boxes(back) == [qb]
        # dequantised values within half a step of the originals (the codec's stated precision)
        for q, t in zip(qt, (t0, t1)):
            assert abs(codec.dequantize_time(q, duration) - t) <= duration / (2 * codec.N_TIME) + 1e-9
        for v, orig, ext in zip(codec.dequantize_box(qb, w, h), box, (w, h, w, h)):
            assert abs(v - orig) <= ext / (2 * codec.N_SPACE) + 1e-9


def test_token_mode_gives_one_token_per_value_with_initialised_rows(tiny):
    from transformers import AutoProcessor

    from experts.base import resolve_tiny

    model, proc = tiny
    fresh_tok = AutoProcessor.from_pretrained(resolve_tiny("tiny://qwen2_vl")).tokenizer
    emb_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()
    n_before = len(proc.tokenizer)
    cfg = ModelPartsConfig(position_tokens=PositionTokensConfig(mode="tokens", init="digits"))
    parts = apply_model_parts(model, proc, cfg, codec)
    tok = proc.tokenizer
    assert len(tok) == n_before + (codec.N_TIME + 1) + (codec.N_SPACE + 1)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert len(parts.new_token_ids) == len(set(parts.new_token_ids)) == 1302
    for q in (0, 1, 150, 299, 300):
        assert len(tok(codec.format_time(q), add_special_tokens=False)["input_ids"]) == 1
    for v in (0, 7, 500, 999, 1000):
        ids = tok(codec.format_coord_token(v), add_special_tokens=False)["input_ids"]
        assert len(ids) == 1
        # digits init, replayed with an untouched tokenizer: mean of the embeddings of the number's digits
        digit_ids = fresh_tok(str(v), add_special_tokens=False)["input_ids"]
        for table, before in ((model.get_input_embeddings().weight, emb_before),
                              (model.get_output_embeddings().weight, head_before)):
            torch.testing.assert_close(table[ids[0]].detach(), before[digit_ids].mean(0))
    # the box text the model sees: four coordinate tokens, brackets and commas unchanged
    assert parts.to_model_text("[1, 22, 333, 1000]") == "[<c1>, <c22>, <c333>, <c1000>]"
    # applying twice (e.g. a second model with the same processor) initialises the new model's rows too
    from transformers import AutoModelForImageTextToText

    model2 = AutoModelForImageTextToText.from_pretrained(resolve_tiny("tiny://qwen2_vl"))
    parts2 = apply_model_parts(model2, proc, cfg, codec)
    assert parts2.new_token_ids == parts.new_token_ids
    torch.testing.assert_close(model2.get_input_embeddings().weight[parts.new_token_ids[5]],
                               model.get_input_embeddings().weight[parts.new_token_ids[5]])


def test_mean_init_and_gradients_reach_new_rows(tiny):
    model, proc = tiny
    mean_before = model.get_input_embeddings().weight.detach().mean(0)
    cfg = ModelPartsConfig(position_tokens=PositionTokensConfig(mode="tokens", init="mean"))
    parts = apply_model_parts(model, proc, cfg, codec)
    tok = proc.tokenizer
    text = parts.to_model_text("the ball stops at <120> in [10, 20, 30, 40]")
    ids = tok(text, return_tensors="pt")["input_ids"]
    t_id = tok.convert_tokens_to_ids(codec.format_time(120))
    c_id = tok.convert_tokens_to_ids(codec.format_coord_token(30))
    assert t_id in ids[0].tolist() and c_id in ids[0].tolist()
    torch.testing.assert_close(model.get_input_embeddings().weight[t_id].detach(), mean_before)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for i in (t_id, c_id):
        assert model.get_input_embeddings().weight.grad[i].abs().sum() > 0
        assert model.get_output_embeddings().weight.grad[i].abs().sum() > 0


def test_token_mode_without_codec_is_refused(tiny):
    model, proc = tiny
    with pytest.raises(ValueError, match="codec"):
        apply_model_parts(model, proc, ModelPartsConfig(position_tokens=PositionTokensConfig(mode="tokens")))


def test_per_frame_time_tokens_use_the_codec():
    from experts.model_parts.position_tokens import frame_time_texts

    # iMOVE 3.2.2 appends a relative time token to each frame's visual tokens: round(t / T * 300)
    assert frame_time_texts([0.0, 1.5, 2.99, 3.0], 3.0, codec) == ["<0>", "<150>", "<299>", "<300>"]
