"""JSON-schema constrained decoding for in-process transformers generation (xgrammar).

A :class:`JsonGrammar` belongs to one loaded tokenizer: it compiles JSON schemas into token-level grammars
(once per schema; xgrammar's compiler caches them) and hands ``model.generate`` a logits processor that masks,
at every step, the tokens that cannot continue a JSON value matching the row's schema. Greedy or sampled, the
reply is then valid JSON of the schema's shape unless ``max_new_tokens`` cuts it short, in which case the
caller's validation and repair re-ask apply as before.

xgrammar is a dependency of the project; when it cannot be imported (a stripped-down install) the backends
fall back to unconstrained generation and say so once in the log (:class:`StructuredDecodingUnavailable`).
"""
from __future__ import annotations

import json
import logging
import threading
from typing import Any, Sequence

log = logging.getLogger(__name__)


class StructuredDecodingUnavailable(RuntimeError):
    """xgrammar is not importable here; generation goes unconstrained (validation + repair still apply)."""


# The largest bound a repetition in our patterns may carry (see :func:`one_line_text_pattern`).
MAX_REPEAT = 128


def one_line_text_pattern(max_chars: int) -> str:
    """A JSON-schema ``pattern`` for one line of text: a non-blank first character, then at most ``max_chars - 1``
    characters other than line breaks; the language of ``^\\S.{0,max_chars-1}$``, spelled so that no repetition
    is bounded above :data:`MAX_REPEAT`.

    Why the spelling: xgrammar 0.2.8, the version vLLM 0.33 and 0.34 pin, fails to compile ``.{0,n}`` for n of 129
    or more (``.{0,128}`` compiles) when its grammar cache is on, as vLLM runs it (an internal check in
    ``grammar_functor.cc``). Measured with vLLM 0.33.0's own ``XgrammarBackend``: vLLM's "auto" choice takes
    xgrammar for such a schema, so an in-process engine or a vLLM server cannot compile the request's grammar.
    xgrammar 0.2.7, which SGLang 0.5.23 pins, has the same limit. Past 129 characters the rest is written as whole
    128-character blocks then a shorter tail, ``(.{128}){0,q-1}.{0,127}``, with a second branch,
    ``(.{128}){q}.{0,r}``, for the lengths of the last, partial block. Each length splits into blocks and tail one
    way only, so a matcher keeps few live states, and the grammar grows linearly with ``max_chars`` (4,000
    characters: 0.75 s to compile one field, 5 us per token to mask, in xgrammar 0.2.7, 0.2.8 and 0.2.9 alike)."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    rest = max_chars - 1
    if rest == 0:
        return "^\\S$"
    if rest <= MAX_REPEAT:
        return f"^\\S.{{0,{rest}}}$"
    blocks, tail = divmod(rest, MAX_REPEAT)
    if blocks > MAX_REPEAT:
        raise ValueError(f"max_chars above {MAX_REPEAT * (MAX_REPEAT + 1)} would need a nested block count")
    block = f"(.{{{MAX_REPEAT}}})"
    whole = f".{{0,{MAX_REPEAT - 1}}}" if blocks == 1 else f"{block}{{0,{blocks - 1}}}.{{0,{MAX_REPEAT - 1}}}"
    return f"^\\S({whole}|{block}{{{blocks}}}.{{0,{tail}}})$"


def schema_key(schema: dict | None) -> str | None:
    return None if schema is None else json.dumps(schema, sort_keys=True, separators=(",", ":"))


def _stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for v in (eos if isinstance(eos, (list, tuple)) else [eos]) + [getattr(tokenizer, "eos_token_id", None)]:
        if isinstance(v, int) and v not in ids:
            ids.append(v)
    return ids


class JsonGrammar:
    """Compiles JSON schemas against one tokenizer and builds per-``generate`` logits processors."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        try:
            import xgrammar as xgr
        except ImportError as exc:  # pragma: no cover - xgrammar is a project dependency
            raise StructuredDecodingUnavailable(
                f"xgrammar is not installed ({exc}); install the project's dependencies for constrained decoding"
            ) from exc
        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids) or None)
        self._compiler = xgr.GrammarCompiler(info)
        self._compiled: dict[str, Any] = {}
        self._lock = threading.Lock()

    def compiled(self, schema: dict) -> Any:
        key = schema_key(schema)
        with self._lock:
            g = self._compiled.get(key)
            if g is None:
                # any_whitespace=False: no runs of blanks between tokens (a weak model could otherwise spend its
                # whole budget on whitespace); strict_mode: no properties beyond the schema's.
                g = self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
                self._compiled[key] = g
        return g

    def logits_processor(self, schemas: Sequence[dict]) -> Any:
        """A fresh processor for one ``generate`` call whose rows follow ``schemas`` (one per row, in order)."""
        from xgrammar.contrib.hf import LogitsProcessor

        return LogitsProcessor([self.compiled(s) for s in schemas])


_GRAMMARS: dict[int, tuple[Any, JsonGrammar]] = {}
_GRAMMARS_LOCK = threading.Lock()
_warned = False


def json_grammar_for(model: Any, tokenizer: Any) -> JsonGrammar | None:
    """The :class:`JsonGrammar` of a loaded (model, tokenizer) pair, built once; None when xgrammar is missing."""
    global _warned
    with _GRAMMARS_LOCK:
        hit = _GRAMMARS.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        try:
            emb = model.get_output_embeddings()
            vocab = int(emb.weight.shape[0]) if emb is not None else len(tokenizer)
            grammar = JsonGrammar(tokenizer, max(vocab, len(tokenizer)), _stop_token_ids(model, tokenizer))
        except StructuredDecodingUnavailable as exc:
            if not _warned:
                log.warning("%s; JSON replies are validated and re-asked instead", exc)
                _warned = True
            return None
        _GRAMMARS[id(tokenizer)] = (tokenizer, grammar)
        return grammar
