"""One asynchronous client for OpenAI-compatible chat endpoints (GPT-4o, vLLM, SGLang, GLM, ...).

Both the VLM and the LLM experts use it when their spec says ``backend="openai"``. What it does:

* ``POST {base_url}/chat/completions`` with aiohttp, at most ``max_concurrency`` requests in flight (an
  ``asyncio.Semaphore`` held per attempt, so a request sleeping in back-off does not hold a slot);
* retries on 408 / 409 / 429 / 5xx, timeouts and connection errors with tenacity: exponential back-off with
  jitter, capped, honouring ``Retry-After`` when the server sends one (also capped);
* a per-request deadline (``timeout_s``) covering connect, upload and the whole response;
* the response cache: successes are stored under a hash of (endpoint model, messages, parameters) and
  looked up before anything is sent, so a re-run never pays twice. Failures are never cached;
* sync callers go through a private event loop running in a daemon thread (``chat``); async callers can
  await ``achat`` directly.

Secrets: the API key is read from the environment variable named by ``spec.api_key_env`` at call time, is
only ever put into the ``Authorization`` header, and is scrubbed from every error string this module
produces (servers sometimes echo the header back). It never reaches the cache (keys and values are built
from model, messages and parameters only).

Failure policy (ARCHITECTURE.md rule 4): a request that fails after its retries gives a ``ChatResult`` with
``error`` set. Misconfiguration that would fail every request raises for the batch instead, so the shard
fails and Prefect retries it: a missing API key (:class:`MissingApiKeyError`), 401/403
(:class:`EndpointAuthError`), 404 on the endpoint (:class:`EndpointConfigError`), and an endpoint that no
request could reach after retries (:class:`EndpointUnreachableError`).
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import random
import re
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Awaitable, Iterable, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import Field, SerializationInfo, SerializerFunctionWrapHandler, field_serializer

from experts.base import ModelSpec
from experts.vllm_chat import VllmEngineOptions

log = logging.getLogger(__name__)

Backend = Literal["transformers", "openai", "vllm"]  # vllm: in-process engine (optional extra)
T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------------
# Spec shared by the LLM and VLM experts
# ----------------------------------------------------------------------------------------------------------
class ChatSpec(ModelSpec):
    """Fields shared by :class:`experts.llm.LlmSpec` and :class:`experts.vlm.VlmSpec`.

    With ``backend="openai"``, ``model_id`` is the endpoint's model name (``gpt-4o``,
    ``Qwen/Qwen2-VL-7B-Instruct`` as served by vLLM, ...); ``device``/``dtype`` are ignored.
    """

    backend: Backend = "transformers"
    # -- OpenAI-compatible endpoint --
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str | None = "OPENAI_API_KEY"  # None: the endpoint needs no key (local vLLM / SGLang)
    # Name of a Prefect Secret block holding the key. The flow layer copies it into $api_key_env of the worker
    # process before the stage runs (experts never talk to Prefect); the key itself is never in any config.
    api_key_secret_block: str | None = None
    max_concurrency: int = Field(8, ge=1, le=1024)
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    retry_initial_s: float = Field(1.0, ge=0)
    retry_max_s: float = Field(60.0, ge=0)
    supports_json_schema: bool = False  # send response_format={"type": "json_schema", ...}
    json_schema_strict: bool = False  # OpenAI strict structured outputs: the schema goes out in its strict form
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # -- generation defaults (both backends); temperature 0 means greedy --
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0)
    seed: int | None = None
    # -- in-process transformers --
    batch_size: int = Field(8, ge=1)
    # -- in-process vLLM (experts.vllm_chat): engine arguments, e.g. each engine's share of GPU memory --
    # Dumped only when set, so configs written before the field existed dump (and hash) as they did.
    vllm_engine: VllmEngineOptions = Field(VllmEngineOptions(), exclude_if=lambda v: v == VllmEngineOptions())

    @field_serializer("vllm_engine", mode="wrap")
    def _engine_for_hash(self, value: VllmEngineOptions, handler: SerializerFunctionWrapHandler,
                         info: SerializationInfo) -> dict[str, Any] | str:
        """In a stage's config hash only the options that change replies count. The protocol is
        stages.base.StageConfig.config_hash's (experts do not import stages): it dumps with the context
        {"config_hash": True} and leaves out every key whose value is "<not hashed>"."""
        if (info.context or {}).get("config_hash"):
            return value.hashed() or "<not hashed>"
        return handler(value)

    @property
    def enforces_json_schema(self) -> bool:
        """Whether a request's JSON schema is enforced while decoding: in-process (xgrammar constrained
        decoding; vLLM's guided decoding) or an endpoint that takes ``response_format`` with a JSON schema."""
        return self.backend in ("transformers", "vllm") or self.supports_json_schema


# ----------------------------------------------------------------------------------------------------------
# Cache protocol (implemented by storage.response_cache.ResponseCache; experts never import storage)
# ----------------------------------------------------------------------------------------------------------
@runtime_checkable
class ResponseCacheLike(Protocol):
    def get(self, key: str) -> dict | None: ...

    def put(self, key: str, value: dict) -> None: ...

    def request_key(self, model: str, messages: list[dict], params: dict) -> str: ...


# ----------------------------------------------------------------------------------------------------------
# Errors and secret scrubbing
# ----------------------------------------------------------------------------------------------------------
class EndpointError(RuntimeError):
    """Misconfiguration or outage that affects every request of a batch (raised, not returned per item)."""


class MissingApiKeyError(EndpointError):
    pass


class EndpointAuthError(EndpointError):
    pass


class EndpointConfigError(EndpointError):
    pass


class EndpointUnreachableError(EndpointError):
    pass


REDACTED = "[REDACTED]"
_BEARER_RE = re.compile(r"(?i)(bearer\s+)[^\s\"',;]+")
_SK_RE = re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}")


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Remove secrets from ``text``: the given values, ``Bearer <token>`` and ``sk-...`` shaped keys."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, REDACTED)
    text = _BEARER_RE.sub(lambda m: m.group(1) + REDACTED, text)
    return _SK_RE.sub(REDACTED, text)


# ----------------------------------------------------------------------------------------------------------
# Requests and results
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChatCall:
    """One chat completion: OpenAI-format ``messages`` plus generation ``params`` (JSON body fields)."""

    messages: list[dict]
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ChatResult:
    text: str | None
    error: str | None
    cached: bool
    model: str
    finish_reason: str | None = None


def encode_image_data_url(image: Any, *, quality: int = 90, max_side_px: int | None = None) -> str:
    """Encode an HxWx3 (or HxW, HxWx4) uint8 array -- or floats in [0, 1] -- as a JPEG ``data:`` URL."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or arr.size == 0:
        raise ValueError(f"expected an image array HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr).convert("RGB")
    if max_side_px and max(img.size) > max_side_px:
        scale = max_side_px / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def encode_video_data_url(frames: Any, fps: float, *, crf: int = 18, max_side_px: int | None = None) -> str:
    """Encode frames of one size (RGB uint8, in order) as an H.264 MP4 in a ``data:video/mp4`` URL: constant frame
    rate ``fps`` (so a server's decoder reads the frames' times from the container), yuv420p (what every decoder
    takes; it needs an even width and height, so an odd last row or column is cropped), ``crf`` 18 (near lossless).
    With ``max_side_px`` the frames are first downscaled so their longer side fits it.

    x264's ``ultrafast`` preset: the worker encodes one MP4 per request, and for 16 frames of 640x272 it took 24 ms
    of CPU (228 kB) against 62 ms with ``veryfast`` (113 kB); 16 JPEGs of the same frames took 9 ms (319 kB)."""
    from fractions import Fraction

    import av
    import numpy as np
    from PIL import Image

    arrs = [np.asarray(f) for f in frames]
    if not arrs:
        raise ValueError("a video needs at least one frame")
    if len({a.shape for a in arrs}) != 1 or arrs[0].ndim != 3 or arrs[0].shape[2] != 3 or arrs[0].dtype != np.uint8:
        raise ValueError(f"video frames must be RGB uint8 arrays of one size, got {sorted({(a.shape, str(a.dtype)) for a in arrs})}")
    h, w = arrs[0].shape[:2]
    if max_side_px and max(h, w) > max_side_px:
        scale = max_side_px / max(h, w)
        size = (max(2, round(w * scale)), max(2, round(h * scale)))
        arrs = [np.asarray(Image.fromarray(a).resize(size, Image.BICUBIC)) for a in arrs]
        h, w = arrs[0].shape[:2]
    h, w = h - h % 2, w - w % 2
    if h < 2 or w < 2:
        raise ValueError(f"video frames of {arrs[0].shape[1]}x{arrs[0].shape[0]} px are too small to encode")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "ultrafast"}
        for a in arrs:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a[:h, :w]), format="rgb24")))
        out.mux(stream.encode())
    return "data:video/mp4;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def response_format_for(schema: dict, *, strict: bool) -> dict:
    """OpenAI's ``response_format`` for a JSON schema; with ``strict`` the schema is sent in the strict form
    (:func:`strict_json_schema`), which OpenAI requires for strict structured outputs."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(schema.get("title") or "response"))[:64] or "response"
    return {"type": "json_schema",
            "json_schema": {"name": name, "schema": strict_json_schema(schema) if strict else schema, "strict": strict}}


def strict_json_schema(schema: dict) -> dict:
    """A copy of ``schema`` in the form OpenAI documents for strict structured outputs: every object lists all its
    properties as required and is closed (``additionalProperties: false``, unless it says otherwise), through
    ``$defs`` / ``definitions``, properties, array items and ``anyOf`` / ``allOf`` branches. A ``default`` of null is
    dropped: a required property that admits null says the same. Optional properties therefore become required,
    so the model writes each of them (ours that may be absent, such as qgen's explanation, admit null). Replies still
    validate against the original schema. ``$ref`` targets are made strict where they are defined."""
    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = dict(node)
        for key in ("$defs", "definitions", "properties"):
            if isinstance(out.get(key), dict):
                out[key] = {k: walk(v) for k, v in out[key].items()}
        for key in ("items", "anyOf", "allOf"):
            if key in out:
                out[key] = walk(out[key])
        if out.get("type") == "object" and "additionalProperties" not in out:
            out["additionalProperties"] = False
        if isinstance(out.get("properties"), dict):
            out["required"] = list(out["properties"])
        if "default" in out and out["default"] is None:
            del out["default"]
        return out

    return walk(schema)


# ----------------------------------------------------------------------------------------------------------
# Private event loop for sync callers
# ----------------------------------------------------------------------------------------------------------
class _LoopThread:
    """An asyncio loop in a daemon thread; ``run`` submits a coroutine and blocks for its result."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed() or not (self._thread and self._thread.is_alive()):
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def _main() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=_main, name="openai-compat-loop", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def run(self, coro: Awaitable[T]) -> T:
        loop = self._ensure()
        if self._thread is threading.current_thread():
            raise RuntimeError("sync chat() called from inside its own event loop; await achat() instead")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()  # type: ignore[arg-type]

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=5)
            if not loop.is_running():
                loop.close()


# ----------------------------------------------------------------------------------------------------------
# Attempt outcomes (internal)
# ----------------------------------------------------------------------------------------------------------
class _AttemptError(Exception):
    retryable = False
    kind = "error"

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class _Retryable(_AttemptError):
    retryable = True
    kind = "retryable"


class _Timeout(_Retryable):
    kind = "timeout"


class _Connection(_Retryable):
    kind = "connection"


class _Fatal(_AttemptError):
    """Affects the whole batch (auth, wrong base_url/model)."""

    def __init__(self, message: str, exc_type: type[EndpointError], **kw: Any):
        super().__init__(message, **kw)
        self.exc_type = exc_type


_RETRY_STATUSES = {408, 409, 425, 429}


def _retry_after_seconds(headers: Any) -> float | None:
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        import email.utils

        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class _BackoffWait:
    """tenacity wait: exponential with full jitter, or the server's Retry-After if longer; both capped."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self.initial_s, self.max_s = initial_s, max_s

    def __call__(self, retry_state: Any) -> float:
        n = max(0, retry_state.attempt_number - 1)
        exp = min(self.max_s, self.initial_s * (2**n))
        wait = exp / 2 + random.uniform(0, exp / 2)
        exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return min(wait, self.max_s)


# ----------------------------------------------------------------------------------------------------------
# The client
# ----------------------------------------------------------------------------------------------------------
class OpenAICompatClient:
    """Chat completions against one OpenAI-compatible endpoint. Thread-safe; one instance per spec."""

    def __init__(self, spec: ChatSpec, cache: ResponseCacheLike | None = None) -> None:
        self.spec = spec
        self.cache = cache
        self.url = spec.base_url.rstrip("/") + "/chat/completions"
        import aiohttp  # noqa: F401  (import cost belongs to loading, not to the first batch)
        import tenacity  # noqa: F401

        self._loop = _LoopThread()
        weakref.finalize(self, self._loop.close)  # stop the private loop thread when the client is dropped

    # -- public ------------------------------------------------------------------------------------------
    def chat(self, calls: list[ChatCall]) -> list[ChatResult]:
        """Blocking version of :meth:`achat` (runs on the client's private event loop)."""
        if not calls:
            return []
        return self._loop.run(self.achat(calls))

    async def achat(self, calls: list[ChatCall]) -> list[ChatResult]:
        import aiohttp

        results: list[ChatResult | None] = [None] * len(calls)
        keys: list[str | None] = [None] * len(calls)
        pending: list[int] = []
        for i, call in enumerate(calls):
            if self.cache is not None:
                keys[i] = self.cache.request_key(self.spec.model_id, call.messages, call.params)
                hit = self._cache_get(keys[i])
                if hit is not None:
                    results[i] = hit
                    continue
            pending.append(i)
        if not pending:
            return results  # type: ignore[return-value]

        api_key = self._api_key()
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        n = self.spec.max_concurrency
        sem = asyncio.Semaphore(n)
        # aiohttp rather than httpx: httpcore's pool re-scans every connection per request (about 2 ms of CPU
        # per request at 32 connections here), which alone cost ~25% of the ideal throughput in the benchmark.
        connector = aiohttp.TCPConnector(limit=n, limit_per_host=n)
        session = aiohttp.ClientSession(
            connector=connector, headers=headers, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=self.spec.timeout_s),
        )
        async with session:
            outcomes = await asyncio.gather(
                *(self._one(session, sem, calls[i], keys[i], api_key) for i in pending), return_exceptions=True
            )

        fatal = next((o for o in outcomes if isinstance(o, _Fatal)), None)
        if fatal is not None:
            raise fatal.exc_type(str(fatal)) from None
        unexpected = next((o for o in outcomes if isinstance(o, BaseException) and not isinstance(o, _AttemptError)), None)
        if unexpected is not None:
            raise EndpointError(
                scrub(f"unexpected {type(unexpected).__name__} talking to {self.url}: {unexpected}", [api_key])
            ) from None
        if all(isinstance(o, _Connection) for o in outcomes):
            raise EndpointUnreachableError(
                scrub(
                    f"could not reach {self.url} for any of {len(pending)} request(s) after "
                    f"{self.spec.max_retries} retries ({outcomes[0]}); check base_url and that the server is up",
                    [api_key],
                )
            )
        for i, o in zip(pending, outcomes):
            if isinstance(o, ChatResult):
                results[i] = o
            else:
                results[i] = ChatResult(text=None, error=str(o), cached=False, model=self.spec.model_id)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self._loop.close()

    # -- internals ---------------------------------------------------------------------------------------
    def _api_key(self) -> str | None:
        env = self.spec.api_key_env
        if env is None:
            return None
        key = os.environ.get(env)
        if not key:
            raise MissingApiKeyError(
                f"environment variable {env} is not set; the endpoint {self.spec.base_url} for model "
                f"{self.spec.model_id} needs an API key (export {env}=..., fill it from a Prefect Secret block, "
                f"or set api_key_env=None for an endpoint without authentication)"
            )
        return key

    def _cache_get(self, key: str | None) -> ChatResult | None:
        if self.cache is None or key is None:
            return None
        try:
            value = self.cache.get(key)
        except Exception as exc:  # a broken cache must not stop the run; it only costs a request
            log.warning("response cache read failed for %s: %s", key[:12], exc)
            return None
        if not value or not isinstance(value.get("text"), str):
            return None
        return ChatResult(
            text=value["text"], error=None, cached=True, model=str(value.get("model") or self.spec.model_id),
            finish_reason=value.get("finish_reason"),
        )

    def _cache_put(self, key: str | None, call: ChatCall, result: ChatResult, usage: Any) -> None:
        if self.cache is None or key is None:
            return
        value = {
            "model": result.model,
            "endpoint_model": self.spec.model_id,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "usage": usage if isinstance(usage, dict) else None,
            "params": call.params,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        try:
            self.cache.put(key, value)
        except Exception as exc:
            log.warning("response cache write failed for %s: %s", key[:12], exc)

    def _payload(self, call: ChatCall) -> dict:
        return {**call.params, "model": self.spec.model_id, "messages": call.messages}

    async def _one(self, session: Any, sem: asyncio.Semaphore, call: ChatCall, key: str | None, api_key: str | None):
        import tenacity

        payload = self._payload(call)
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.spec.max_retries + 1),
            wait=_BackoffWait(self.spec.retry_initial_s, self.spec.retry_max_s),
            retry=tenacity.retry_if_exception(lambda e: isinstance(e, _AttemptError) and e.retryable),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    async with sem:
                        result, usage = await self._attempt(session, payload, api_key)
        except _Fatal:
            raise
        except _AttemptError as exc:
            n = attempt.retry_state.attempt_number
            msg = f"{exc} (gave up after {n} attempt{'s' if n != 1 else ''})" if exc.retryable else str(exc)
            exc.args = (scrub(msg, [api_key]),)
            raise
        self._cache_put(key, call, result, usage)
        return result

    def _log_retry(self, retry_state: Any) -> None:
        exc = retry_state.outcome.exception()
        log.warning(
            "%s: attempt %d failed (%s); retrying in %.2fs",
            self.spec.model_id, retry_state.attempt_number, exc, retry_state.upcoming_sleep,
        )

    async def _attempt(self, session: Any, payload: dict, api_key: str | None) -> tuple[ChatResult, Any]:
        import aiohttp

        where = f"POST {self.url}"

        async def _post() -> tuple[int, Any, bytes]:
            async with session.post(self.url, json=payload) as r:
                return r.status, r.headers, await r.read()

        try:
            status, resp_headers, body = await asyncio.wait_for(_post(), self.spec.timeout_s)
        except asyncio.TimeoutError:
            raise _Timeout(f"{where}: no response within timeout_s={self.spec.timeout_s}") from None
        except aiohttp.ClientError as exc:
            raise _Connection(scrub(f"{where}: connection failed: {type(exc).__name__}: {exc}", [api_key])) from None

        if status != 200:
            detail = scrub(_error_detail(body), [api_key])
            msg = f"{where}: HTTP {status}: {detail}"
            if status in (401, 403):
                raise _Fatal(
                    f"{msg}; the API key in ${self.spec.api_key_env} was rejected (check the key and its permissions)",
                    EndpointAuthError, status=status,
                )
            if status == 404:
                raise _Fatal(
                    f"{msg}; check base_url ({self.spec.base_url}) and model_id ({self.spec.model_id})",
                    EndpointConfigError, status=status,
                )
            if status in _RETRY_STATUSES or status >= 500:
                raise _Retryable(msg, status=status, retry_after_s=_retry_after_seconds(resp_headers))
            raise _AttemptError(msg, status=status)
        try:
            data = json.loads(body)
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _Retryable(f"{where}: HTTP 200 but the body is not a chat completion: {scrub(_error_detail(body), [api_key])}") from None
        if text is None:
            refusal = choice["message"].get("refusal")
            raise _AttemptError(f"{where}: the model returned no content" + (f" (refusal: {refusal})" if refusal else ""))
        result = ChatResult(
            text=str(text), error=None, cached=False, model=str(data.get("model") or self.spec.model_id),
            finish_reason=choice.get("finish_reason"),
        )
        return result, data.get("usage")


def _error_detail(body: bytes, limit: int = 300) -> str:
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
        if isinstance(data, dict) and isinstance(data.get("error"), dict) and data["error"].get("message"):
            text = str(data["error"]["message"])
        elif isinstance(data, dict) and isinstance(data.get("error"), str):
            text = data["error"]
    except ValueError:
        pass
    text = " ".join(text.split())
    return text[:limit] + ("..." if len(text) > limit else "") if text else "<empty body>"
