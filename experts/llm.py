"""Language model expert: text chat through an in-process transformers causal LM or an OpenAI-compatible endpoint.

``load_llm(spec, cache)`` returns an :class:`Llm`. ``Llm.generate`` maps a list of :class:`LlmRequest` to a
list of :class:`LlmResponse` (one per request, in order; a failed item carries ``error`` instead of raising).
``Llm.generate_json`` asks for a JSON object matching a pydantic model: with ``spec.supports_json_schema`` the
endpoint is sent ``response_format={"type": "json_schema", ...}``, and the in-process transformers backend
decodes under the schema (xgrammar, :mod:`experts.structured`); in every case the reply is parsed and
validated with pydantic, and invalid replies are re-asked up to ``repair_retries`` times, showing the model
its previous reply and the validation error (MotionBench question generation, seed 000 section 9.2, relies
on this to get well-formed option lists out of GPT-4o).

Construction / loading / inference are separate: ``build_tiny_qwen2_lm`` writes a random miniature,
``_load_transformers`` resolves weights (HF id, local path or ``tiny://qwen2_lm``) once per process, and the
backends only run inference.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar

from pydantic import BaseModel, ValidationError

from experts.base import ModelSpec, get_expert, hf_load, register_tiny, resolve_device, resolve_dtype
from experts.openai_compat import ChatCall, ChatSpec, OpenAICompatClient, ResponseCacheLike, response_format_for

log = logging.getLogger(__name__)
T = TypeVar("T")


class LlmSpec(ChatSpec):
    """A text model. ``model_id``: HF id / local path / ``tiny://qwen2_lm`` (transformers) or endpoint model."""


@dataclass(frozen=True)
class LlmRequest:
    prompt: str
    system: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    json_schema: dict | None = None


@dataclass(frozen=True)
class LlmResponse:
    text: str | None
    error: str | None
    cached: bool
    model: str


@dataclass(frozen=True)
class JsonResult:
    value: BaseModel | None
    raw: str | None
    error: str | None
    attempts: int


# ----------------------------------------------------------------------------------------------------------
# Helpers shared with experts.vlm
# ----------------------------------------------------------------------------------------------------------
def generation_params(spec: ChatSpec, max_new_tokens: int | None, temperature: float | None) -> tuple[int, float]:
    return (spec.max_new_tokens if max_new_tokens is None else int(max_new_tokens),
            spec.temperature if temperature is None else float(temperature))


def openai_params(spec: ChatSpec, max_new_tokens: int, temperature: float, json_schema: dict | None) -> dict:
    params: dict[str, Any] = {spec.max_tokens_param: max_new_tokens, "temperature": temperature}
    if spec.seed is not None:
        params["seed"] = spec.seed
    if json_schema is not None and spec.supports_json_schema:
        params["response_format"] = response_format_for(json_schema, strict=spec.json_schema_strict)
    return params


def schema_instruction(schema: dict) -> str:
    return (
        "Reply with only a JSON object that conforms to this JSON schema (no prose, no code fences):\n"
        + json.dumps(schema, separators=(",", ":"))
    )


def batches_by(items: Sequence[int], key: Callable[[int], Any], batch_size: int) -> Iterable[list[int]]:
    """Indices grouped by ``key`` (requests in one ``generate`` call share generation settings), in chunks."""
    groups: dict[Any, list[int]] = {}
    for i in items:
        groups.setdefault(key(i), []).append(i)
    for idx in groups.values():
        for s in range(0, len(idx), batch_size):
            yield idx[s:s + batch_size]


def run_isolated(batch: list[int], fn: Callable[[list[int]], list[T]], what: str) -> dict[int, T | Exception]:
    """Run ``fn`` on a batch; if the batch fails, run items one by one so only the bad item errors."""
    try:
        out = fn(batch)
        return dict(zip(batch, out))
    except Exception as exc:
        if len(batch) == 1:
            return {batch[0]: exc}
        log.warning("%s: batch of %d failed (%s: %s); retrying items one at a time", what, len(batch), type(exc).__name__, exc)
    res: dict[int, T | Exception] = {}
    for i in batch:
        try:
            res[i] = fn([i])[0]
        except Exception as exc:  # one bad item is a row, not a crash
            res[i] = exc
    return res


def describe_exception(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def json_constraint_kwargs(model: Any, tokenizer: Any, schemas: Sequence[dict | None]) -> dict:
    """``generate`` kwargs that constrain every row to its JSON schema (xgrammar); {} when the batch has no
    schema or xgrammar is missing. A batch is all-schema or no-schema (the backends batch by that)."""
    if not schemas or any(s is None for s in schemas):
        return {}
    from experts.structured import json_grammar_for

    grammar = json_grammar_for(model, tokenizer)
    if grammar is None:
        return {}
    return {"logits_processor": [grammar.logits_processor(schemas)]}  # type: ignore[arg-type]


def _sampling_kwargs(temperature: float) -> dict:
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


# ----------------------------------------------------------------------------------------------------------
# JSON parsing and repair
# ----------------------------------------------------------------------------------------------------------
_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)


def extract_json(text: str) -> Any:
    """Parse the first JSON value in ``text``, tolerating code fences and prose around it."""
    candidates = [m.group(1) for m in _FENCE_RE.finditer(text)] + [text]
    decoder = json.JSONDecoder(strict=False)  # raw control characters inside strings are tolerated
    last: Exception | None = None
    for cand in candidates:
        cand = cand.strip()
        for start, ch in enumerate(cand):
            if ch in "{[":
                try:
                    value, _ = decoder.raw_decode(cand, start)
                    return value
                except ValueError as exc:
                    last = exc
                    break  # the first bracket did not start valid JSON; try the next candidate
    raise ValueError(f"no JSON object found in the reply ({last})" if last else "no JSON object found in the reply")


def validate_json(text: str, model: type[BaseModel]) -> BaseModel:
    value = extract_json(text)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:8]
        )
        raise ValueError(f"JSON does not match {model.__name__}: {problems}") from None


def repair_prompt(error: str, schema: dict) -> str:
    return (
        f"Your previous reply could not be used: {error}\n"
        "Reply again with only a JSON object that conforms to this JSON schema (no prose, no code fences):\n"
        + json.dumps(schema, separators=(",", ":"))
    )


# ----------------------------------------------------------------------------------------------------------
# Tiny tokenizer + tiny Qwen2 causal LM (offline miniatures; ENVIRONMENT.md)
# ----------------------------------------------------------------------------------------------------------
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# Same turn format as the Qwen2 / Qwen2-VL chat templates: <|im_start|>role\n...<|im_end|>\n, images and videos
# as vision_start/pad/end placeholders that the processor expands.
TINY_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TINY_CORPUS = (
    "The red car moves from the left side of the frame to the right while the camera pans slowly.",
    "A person jumps twice, turns around and walks away from the camera.",
    "Question: how many times does the dog spin? A. once B. twice C. three times D. four times",
    '{"question": "What does the man do first?", "options": ["A", "B", "C", "D"], "answer": "B"}',
    "The camera zooms in; the ball bounces three times and rolls out of view at the bottom.",
)


def build_tiny_qwen_tokenizer(vocab_size: int = 384, named_special_tokens: dict[str, str] | None = None):
    """Byte-level BPE trained in memory on a few motion sentences, plus the Qwen special tokens.

    ``named_special_tokens`` adds model-specific named tokens (InternVL: ``{"context_image_token": "<IMG_CONTEXT>"}``)
    that become tokenizer attributes, as in the released checkpoints' tokenizer configs."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(list(_TINY_CORPUS) * 4, trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab = {"<|endoftext|>": 0}
    for tok, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    named = dict(named_special_tokens or {})
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         **({"model_specific_special_tokens": named} if named else {}))
    specials = list(QWEN_SPECIAL_TOKENS[1:]) + [t for t in named.values() if t not in QWEN_SPECIAL_TOKENS]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tok.chat_template = TINY_QWEN_CHAT_TEMPLATE
    return tok


def tiny_text_config_kwargs(tok, **extra: Any) -> dict:
    ids = tok.convert_tokens_to_ids
    kw = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, initializer_range=0.2,
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    )
    kw.update(extra)
    return kw


@register_tiny("qwen2_lm")
def build_tiny_qwen2_lm(out_dir: Path) -> None:
    """Random-initialised Qwen2 causal LM (~30 k parameters) with the tiny Qwen tokenizer and chat template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tiny_qwen_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**tiny_text_config_kwargs(tok), tie_word_embeddings=True))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------
Messages = list[dict]


@dataclass(frozen=True)
class ChatItem:
    """One chat as a backend sees it: OpenAI-format messages plus resolved generation settings."""

    messages: Messages
    max_new_tokens: int
    temperature: float
    json_schema: dict | None = None


class ChatBackend(Protocol):
    """What :class:`Llm` drives: one response per item, in order, failures as ``error`` (tests script this)."""

    def run(self, items: list[ChatItem]) -> list[LlmResponse]: ...


class _LmWeights(ModelSpec):
    """Cache key for loaded causal-LM weights (independent of generation defaults)."""


def _load_transformers(spec: ModelSpec) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    tok = hf_load(AutoTokenizer.from_pretrained, spec.model_id, spec.revision)
    tok.padding_side = "left"  # decoder-only batched generation continues every row at the right edge
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"{spec.model_id} has no chat template; use an instruct/chat checkpoint")
    model = hf_load(AutoModelForCausalLM.from_pretrained, spec.model_id, spec.revision, dtype=dtype)
    return model.to(device).eval(), tok


class _TransformersChat:
    def __init__(self, spec: LlmSpec) -> None:
        self.spec = spec
        self.model_name = spec.model_id + (f"@{spec.revision}" if spec.revision else "")
        key = _LmWeights(model_id=spec.model_id, revision=spec.revision, device=spec.device, dtype=spec.dtype)
        self.model, self.tokenizer = get_expert(key, _load_transformers)

    def run(self, items: list[ChatItem]) -> list[LlmResponse]:
        out: dict[int, Any] = {}
        for batch in batches_by(range(len(items)), lambda i: (items[i].max_new_tokens, items[i].temperature,
                                                              items[i].json_schema is not None), self.spec.batch_size):
            out.update(run_isolated(batch, lambda b: self._generate([items[i] for i in b]), self.model_name))
        return [
            LlmResponse(text=None, error=describe_exception(o), cached=False, model=self.model_name)
            if isinstance(o, Exception) else LlmResponse(text=o, error=None, cached=False, model=self.model_name)
            for o in (out[i] for i in range(len(items)))
        ]

    def _generate(self, items: list[ChatItem]) -> list[str]:
        import torch

        tok = self.tokenizer
        texts = [tok.apply_chat_template(it.messages, add_generation_prompt=True, tokenize=False) for it in items]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=items[0].max_new_tokens, pad_token_id=tok.pad_token_id,
                **_sampling_kwargs(items[0].temperature),
                **json_constraint_kwargs(self.model, tok, [it.json_schema for it in items]),
            )
        new = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


class _OpenAIChat:
    def __init__(self, spec: LlmSpec, cache: ResponseCacheLike | None) -> None:
        self.spec = spec
        self.client = OpenAICompatClient(spec, cache)

    def run(self, items: list[ChatItem]) -> list[LlmResponse]:
        calls = [
            ChatCall(it.messages, openai_params(self.spec, it.max_new_tokens, it.temperature, it.json_schema))
            for it in items
        ]
        return [LlmResponse(r.text, r.error, r.cached, r.model) for r in self.client.chat(calls)]

    def close(self) -> None:
        self.client.close()


class _VllmLlm:
    """In-process vLLM (experts.vllm_chat): every item of the call in one engine call, guided JSON decoding."""

    def __init__(self, spec: LlmSpec, cache: ResponseCacheLike | None) -> None:
        from experts.vllm_chat import VllmChat

        self.chat = VllmChat(spec, cache)

    def run(self, items: list[ChatItem]) -> list[LlmResponse]:
        res = self.chat.run([(it.messages, it.max_new_tokens, it.temperature, it.json_schema) for it in items])
        return [LlmResponse(text, err, cached, self.chat.model_name) for text, err, cached in res]


# ----------------------------------------------------------------------------------------------------------
# Public expert
# ----------------------------------------------------------------------------------------------------------
class Llm:
    def __init__(self, spec: LlmSpec, backend: ChatBackend) -> None:
        self.spec = spec
        self._backend = backend

    def _item(self, req: LlmRequest, *, schema_in_prompt: bool = False) -> ChatItem:
        n, temp = generation_params(self.spec, req.max_new_tokens, req.temperature)
        system = req.system
        native = self.spec.backend == "openai" and self.spec.supports_json_schema
        if req.json_schema is not None and (schema_in_prompt or not native):
            system = f"{system}\n\n{schema_instruction(req.json_schema)}" if system else schema_instruction(req.json_schema)
        messages: Messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": req.prompt}
        ]
        return ChatItem(messages, n, temp, req.json_schema)

    def generate(self, prompts: list[LlmRequest]) -> list[LlmResponse]:
        """One response per request, in order; per-item failures carry ``error``."""
        if not prompts:
            return []
        return self._backend.run([self._item(p) for p in prompts])

    def generate_json(
        self, requests: list[LlmRequest], model: type[BaseModel], repair_retries: int = 2
    ) -> list[JsonResult]:
        """Structured output validated against ``model``; invalid replies are re-asked ``repair_retries`` times."""
        if repair_retries < 0:
            raise ValueError("repair_retries must be >= 0")
        schema = model.model_json_schema()
        items = [self._item(LlmRequest(r.prompt, r.system, r.max_new_tokens, r.temperature, r.json_schema or schema))
                 for r in requests]
        results: list[JsonResult | None] = [None] * len(items)
        attempts = [0] * len(items)
        last_raw: list[str | None] = [None] * len(items)
        last_err: list[str] = [""] * len(items)
        todo = list(range(len(items)))
        for round_ in range(repair_retries + 1):
            if not todo:
                break
            responses = self._backend.run([items[i] for i in todo])
            retry: list[int] = []
            for i, resp in zip(todo, responses):
                attempts[i] += 1
                if resp.error is not None:  # transport failure: already retried by the backend, not a JSON problem
                    results[i] = JsonResult(None, last_raw[i], f"request failed: {resp.error}", attempts[i])
                    continue
                last_raw[i] = resp.text
                try:
                    results[i] = JsonResult(validate_json(resp.text or "", model), resp.text, None, attempts[i])
                except ValueError as exc:
                    last_err[i] = str(exc)
                    it = items[i]
                    items[i] = ChatItem(
                        it.messages + [{"role": "assistant", "content": resp.text or ""},
                                       {"role": "user", "content": repair_prompt(str(exc), items[i].json_schema or schema)}],
                        it.max_new_tokens, it.temperature, it.json_schema,
                    )
                    retry.append(i)
            todo = retry
        for i in todo:
            results[i] = JsonResult(
                None, last_raw[i],
                f"no valid {model.__name__} JSON after {attempts[i]} attempt(s) "
                f"({repair_retries} repair re-ask(s)); last problem: {last_err[i]}",
                attempts[i],
            )
        return results  # type: ignore[return-value]

    def close(self) -> None:
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Llm":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_llm(spec: LlmSpec, cache: ResponseCacheLike | None = None) -> Llm:
    """Build the expert for ``spec``. Transformers weights are loaded once per process (``get_expert``);
    the response cache applies to the OpenAI-compatible and vLLM backends."""
    if spec.backend == "openai":
        return Llm(spec, _OpenAIChat(spec, cache))
    if spec.backend == "vllm":
        return Llm(spec, _VllmLlm(spec, cache))
    return Llm(spec, _TransformersChat(spec))
