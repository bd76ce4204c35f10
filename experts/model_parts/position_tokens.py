"""iMOVE 3.2.2 relative spatiotemporal position tokens as the model sees them.

The text forms belong to the export's codec (``stages/shared/relative_tokens.py``); this module only changes
the model and tokenizer, and the codec is passed in (experts do not import stages). In ``numbers`` mode
(the paper's choice) nothing changes: ``<150>`` and ``[12, 34, 56, 78]`` go through the existing vocabulary.
In ``tokens`` mode every time value 0..300 and every coordinate value 0..1000 becomes one added tokenizer
entry with an initialised embedding row (and output row when the head is not tied).
"""
from __future__ import annotations

import re
from typing import Any, Protocol, Sequence

import torch

from experts.model_parts.config import PositionTokensConfig


class RelativeTokenCodec(Protocol):
    """What this module needs from the export's codec (the module ``stages.shared.relative_tokens`` fits)."""

    def time_token_vocabulary(self) -> list[str]: ...
    def coord_token_vocabulary(self) -> list[str]: ...
    def boxes_to_coord_tokens(self, text: str) -> str: ...
    def coord_tokens_to_boxes(self, text: str) -> str: ...
    def quantize_time(self, t_s: float, duration_s: float) -> int: ...
    def format_time(self, q: int) -> str: ...


def tokenizer_of(processor_or_tokenizer: Any) -> Any:
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def position_vocabulary(codec: RelativeTokenCodec) -> list[str]:
    return list(codec.time_token_vocabulary()) + list(codec.coord_token_vocabulary())


def _value_digits(token: str) -> str:
    m = re.search(r"\d+", token)
    if m is None:
        raise ValueError(f"position token {token!r} carries no number")
    return m.group()


def add_position_tokens(model: Any, processor_or_tokenizer: Any, codec: RelativeTokenCodec,
                        cfg: PositionTokensConfig) -> tuple[int, ...]:
    """Add the codec's dedicated tokens to the tokenizer and initialised rows to the model; returns the ids
    of all position tokens (give them to peft's ``trainable_token_indices`` when the embeddings are otherwise frozen)."""
    from tokenizers import AddedToken

    tok = tokenizer_of(processor_or_tokenizer)
    vocab = position_vocabulary(codec)
    known = tok.get_vocab()
    missing = [t for t in vocab if t not in known]
    if missing:
        # not special: decoding with skip_special_tokens=True must keep them; not normalized: the byte-level
        # pre-tokenizer must not split them before the added-vocabulary match
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    ids = tok.convert_tokens_to_ids(vocab)
    old_size = model.get_input_embeddings().weight.shape[0]
    # rows the model lacks (a tokenizer that already has the tokens may meet a freshly loaded model)
    to_init = [(t, i) for t, i in zip(vocab, ids) if i >= old_size]
    if to_init:
        model.resize_token_embeddings(max(len(tok), old_size), mean_resizing=False)
        emb = model.get_input_embeddings().weight
        out_layer = model.get_output_embeddings()
        tables = [emb] + ([out_layer.weight] if out_layer is not None and out_layer.weight is not emb else [])
        digit_ids = {t: tok(_value_digits(t), add_special_tokens=False)["input_ids"] for t, _ in to_init}
        with torch.no_grad():
            for table in tables:
                base = table[:old_size]
                mean_all = base.float().mean(0)
                for t, i in to_init:
                    row = base[digit_ids[t]].float().mean(0) if cfg.init == "digits" else mean_all
                    table[i] = row.to(table.dtype)
    return tuple(ids)


def to_model_text(text: str, codec: RelativeTokenCodec | None, cfg: PositionTokensConfig) -> str:
    """Export text (codec form) -> the text the model is trained on."""
    if cfg.mode == "numbers":
        return text
    if codec is None:
        raise ValueError("position_tokens.mode='tokens' needs the relative-token codec")
    return codec.boxes_to_coord_tokens(text)


def from_model_text(text: str, codec: RelativeTokenCodec | None, cfg: PositionTokensConfig) -> str:
    """Model output -> codec form (then ``parse_times`` / ``parse_boxes``)."""
    if cfg.mode == "numbers":
        return text
    if codec is None:
        raise ValueError("position_tokens.mode='tokens' needs the relative-token codec")
    return codec.coord_tokens_to_boxes(text)


def frame_time_texts(frame_times_s: Sequence[float], duration_s: float, codec: RelativeTokenCodec) -> list[str]:
    """The relative time token appended to each frame's visual tokens (iMOVE 3.2.2: interleaved with the
    pruned visual tokens), in the codec's form."""
    return [codec.format_time(codec.quantize_time(t, duration_s)) for t in frame_times_s]
