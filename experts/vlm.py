"""Vision-language model expert: images or frame lists + text -> text.

Two backends behind one interface (:class:`Vlm`):

* ``transformers`` (in-process): Qwen2-VL, Qwen2.5-VL and InternVL through ``AutoProcessor`` +
  ``AutoModelForImageTextToText``. The checkpoint's own chat template places image / video placeholders; a
  frame list with ``as_video=True`` goes to the processor as one video (Qwen: 3D patches over time; InternVL:
  its processor's per-frame images). Batched generation with left padding, greedy unless a temperature > 0.
* ``openai`` (HTTP): GPT-4o, vLLM, SGLang, GLM through :mod:`experts.openai_compat`; images are JPEG
  ``data:`` URLs, a video is sent as its frames in order, preceded by one line saying so.

The two iMOVE captioning steps (static caption, then dynamic caption) and the MotionBench first-frame filter
both go through ``Vlm.generate``; stages turn responses with ``error`` set into error rows.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from experts.base import ModelSpec, get_expert, hf_load, register_tiny, resolve_device, resolve_dtype
from experts.llm import (
    _sampling_kwargs,
    batches_by,
    json_constraint_kwargs,
    build_tiny_qwen_tokenizer,
    describe_exception,
    generation_params,
    openai_params,
    run_isolated,
    schema_instruction,
    tiny_text_config_kwargs,
)
from experts.openai_compat import (ChatCall, ChatSpec, OpenAICompatClient, ResponseCacheLike, encode_image_data_url,
                                   encode_video_data_url)

log = logging.getLogger(__name__)


class VlmSpec(ChatSpec):
    """A vision-language model. ``model_id``: HF id / local path / ``tiny://qwen2_vl`` / ``tiny://qwen2_5_vl``
    (transformers) or the endpoint's model name (openai)."""

    jpeg_quality: int = Field(90, ge=1, le=100)  # openai: data-URL encoding
    max_image_side_px: int | None = Field(None, ge=16)  # openai: downscale before encoding (cost control)
    video_fps: float = Field(2.0, gt=0)  # the rate of frame lists given as a video (their metadata / the MP4's rate)
    # openai: how a frame list given as a video reaches the endpoint. "images": one image part per frame, after a line
    # saying they are frames of one video (any endpoint that takes images: GPT-4o, ...). "mp4": one video_url part, an
    # H.264 MP4 at video_fps (experts.openai_compat.encode_video_data_url), which vLLM and SGLang servers decode as one
    # video, so a Qwen2-VL served there sees what the in-process backends give it (3D patches over pairs of frames).
    # Those servers keep at most 2 frames a second of a Qwen-VL's video: leave video_fps at 2 or below for them.
    # Dumped only when set, so configs written before the field existed dump (and hash) as they did.
    endpoint_video: Literal["images", "mp4"] = Field("images", exclude_if=lambda v: v == "images")


@dataclass(frozen=True)
class VlmRequest:
    text: str
    images: tuple[np.ndarray, ...] = ()
    as_video: bool = False
    system: str | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    json_schema: dict | None = None


@dataclass(frozen=True)
class VlmResponse:
    text: str | None
    error: str | None
    cached: bool
    model: str


def as_rgb_uint8(image: Any) -> np.ndarray:
    """HxWx3 uint8 view of an image array (gray, RGBA and [0, 1] floats accepted); clear error otherwise."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected an image array HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and float(np.nanmax(arr)) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------------------------------------------------
# Tiny miniatures (ENVIRONMENT.md): random weights, production architecture and processor
# ----------------------------------------------------------------------------------------------------------
def _tiny_processor(processor_cls: Any, tok: Any):
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    # 28 px = one merged 2x2 block of 14 px patches; at most 2x2 merged tokens per image / frame pair
    pixels = dict(min_pixels=28 * 28, max_pixels=56 * 56)
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=True),
        tokenizer=tok,
        chat_template=tok.chat_template,
    )


def _tiny_vision_ids(tok: Any) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )


def _save_tiny(model: Any, processor: Any, tok: Any, out_dir: Path) -> None:
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


# head_dim 16 -> 8 rotary pairs split over (time, height, width), like Qwen's [16, 24, 24] for head_dim 128
_TINY_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}


@register_tiny("qwen2_vl")
def build_tiny_qwen2_vl(out_dir: Path) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok = build_tiny_qwen_tokenizer()
    cfg = Qwen2VLConfig(
        text_config=tiny_text_config_kwargs(tok, rope_parameters=dict(_TINY_MROPE)),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.2),
        **_tiny_vision_ids(tok),
    )
    torch.manual_seed(0)
    _save_tiny(Qwen2VLForConditionalGeneration(cfg), _tiny_processor(Qwen2VLProcessor, tok), tok, out_dir)


@register_tiny("qwen2_5_vl")
def build_tiny_qwen2_5_vl(out_dir: Path) -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok = build_tiny_qwen_tokenizer()
    cfg = Qwen2_5_VLConfig(
        text_config=tiny_text_config_kwargs(tok, rope_parameters=dict(_TINY_MROPE)),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1], initializer_range=0.2),
        **_tiny_vision_ids(tok),
    )
    torch.manual_seed(0)
    _save_tiny(Qwen2_5_VLForConditionalGeneration(cfg), _tiny_processor(Qwen2_5_VLProcessor, tok), tok, out_dir)


# InternVL (2.5 / 3) checkpoints name their image tokens in the tokenizer config; the processor reads them.
_INTERNVL_TOKENS = {
    "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
# Like the released InternVL templates: <IMG_CONTEXT> marks an image and <video> a frame list, which the
# processor expands to "Frame1: <img>...</img>" lines.
_TINY_INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif c['type'] == 'video' %}<video>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@register_tiny("internvl")
def build_tiny_internvl(out_dir: Path) -> None:
    import torch
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tok = build_tiny_qwen_tokenizer(named_special_tokens=_INTERNVL_TOKENS)
    tok.chat_template = _TINY_INTERNVL_CHAT_TEMPLATE
    # 28 px tiles of 14 px patches, pixel-shuffled by 0.5 -> one context token per tile
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size={"height": 28, "width": 28}, max_patches=2),
        video_processor=InternVLVideoProcessor(size={"height": 28, "width": 28}),
        tokenizer=tok, image_seq_length=1, chat_template=_TINY_INTERNVL_CHAT_TEMPLATE,
    )
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=28, patch_size=14, initializer_range=0.2),
        text_config=dict(model_type="qwen2", **tiny_text_config_kwargs(tok)),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=1, downsample_ratio=0.5,
    )
    torch.manual_seed(0)
    _save_tiny(InternVLForConditionalGeneration(cfg), processor, tok, out_dir)


# ----------------------------------------------------------------------------------------------------------
# transformers backend
# ----------------------------------------------------------------------------------------------------------
class _VlmWeights(ModelSpec):
    """Cache key for loaded VLM weights + processor (independent of generation defaults)."""


def _load_transformers(spec: ModelSpec) -> tuple[Any, Any]:
    model, processor = load_transformers_weights(spec)
    return model.eval(), processor


def load_transformers_weights(spec: ModelSpec, **model_kwargs: Any) -> tuple[Any, Any]:
    """(model, processor) of a transformers VLM on the spec's device and dtype, the processor set up for frames
    that arrive already sampled. Shared by inference (:class:`Vlm`) and fine-tuning (``stages.training``);
    ``model_kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation``). The tokenizer pads on the left,
    as batched generation needs; a trainer sets its own side."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    processor = hf_load(AutoProcessor.from_pretrained, spec.model_id, spec.revision)
    tok = getattr(processor, "tokenizer", None)
    if tok is None or not getattr(processor, "chat_template", None):
        raise ValueError(f"{spec.model_id}: the processor has no tokenizer or chat template; use an instruct checkpoint")
    tok.padding_side = "left"  # batched generation continues every row at the right edge
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    vp = getattr(processor, "video_processor", None)
    if vp is not None:
        if hasattr(vp, "do_sample_frames"):
            vp.do_sample_frames = False  # frames arrive already sampled by the video reader
        if hasattr(vp, "cap_pixels_per_frame") and vp.cap_pixels_per_frame is None:
            vp.cap_pixels_per_frame = True  # qwen-vl-utils' total pixel budget per video
    model = hf_load(AutoModelForImageTextToText.from_pretrained, spec.model_id, spec.revision, dtype=dtype,
                    **model_kwargs)
    return model.to(device), processor


@dataclass(frozen=True)
class _Prepared:
    messages: list[dict]
    images: list[np.ndarray]
    video: np.ndarray | None
    max_new_tokens: int
    temperature: float
    json_schema: dict | None = None


def video_frames(images: Any) -> list[np.ndarray]:
    """A frame list as RGB uint8 frames of one size (a video has one frame size; both in-process backends
    refuse a list that mixes sizes, which makes it that item's error)."""
    frames = [as_rgb_uint8(im) for im in images]
    if len({f.shape for f in frames}) > 1:
        raise ValueError(f"video frames must share one size, got {sorted({f.shape for f in frames})}")
    return frames


class _TransformersVlm:
    def __init__(self, spec: VlmSpec, loaded: tuple[Any, Any] | None = None, name: str | None = None) -> None:
        self.spec = spec
        self.model_name = name or spec.model_id + (f"@{spec.revision}" if spec.revision else "")
        if loaded is None:
            key = _VlmWeights(model_id=spec.model_id, revision=spec.revision, device=spec.device, dtype=spec.dtype)
            self.model, self.processor = get_expert(key, _load_transformers)
        else:
            self.model, self.processor = loaded

    def _prepare(self, req: VlmRequest) -> _Prepared:
        content: list[dict] = []
        images: list[np.ndarray] = []
        video = None
        if req.as_video and req.images:
            video = np.stack(video_frames(req.images))
            content.append({"type": "video"})
        else:
            images = [as_rgb_uint8(im) for im in req.images]
            content.extend({"type": "image"} for _ in images)
        content.append({"type": "text", "text": req.text})
        system = req.system
        if req.json_schema is not None:
            system = f"{system}\n\n{schema_instruction(req.json_schema)}" if system else schema_instruction(req.json_schema)
        messages = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []) + [
            {"role": "user", "content": content}
        ]
        n, temp = generation_params(self.spec, req.max_new_tokens, req.temperature)
        return _Prepared(messages, images, video, n, temp, req.json_schema)

    def run(self, requests: list[VlmRequest]) -> list[VlmResponse]:
        prepared: dict[int, _Prepared] = {}
        out: dict[int, Any] = {}
        for i, req in enumerate(requests):
            try:
                prepared[i] = self._prepare(req)
            except Exception as exc:
                out[i] = exc
        key = lambda i: (prepared[i].max_new_tokens, prepared[i].temperature, prepared[i].json_schema is not None)  # noqa: E731
        for batch in batches_by(list(prepared), key, self.spec.batch_size):
            out.update(run_isolated(batch, lambda b: self._generate([prepared[i] for i in b]), self.model_name))
        return [
            VlmResponse(None, describe_exception(o), False, self.model_name) if isinstance(o, Exception)
            else VlmResponse(o, None, False, self.model_name)
            for o in (out[i] for i in range(len(requests)))
        ]

    def _generate(self, items: list[_Prepared]) -> list[str]:
        import torch

        proc = self.processor
        texts = [proc.apply_chat_template(it.messages, add_generation_prompt=True, tokenize=False) for it in items]
        images = [im for it in items for im in it.images]
        videos = [it.video for it in items if it.video is not None]
        from experts.model_parts import attached_parts

        parts = attached_parts(self.model)  # papers' model parts: same text forms and batch layout as in training
        if parts is not None:
            texts = [parts.to_model_text(t) for t in texts]
            videos = [parts.prepare_video(v) for v in videos]
        kwargs: dict[str, Any] = {}
        if videos:
            kwargs["video_metadata"] = [
                {"fps": self.spec.video_fps, "total_num_frames": len(v), "duration": len(v) / self.spec.video_fps}
                for v in videos
            ]
        enc = proc(text=texts, images=images or None, videos=videos or None, padding=True, return_tensors="pt", **kwargs)
        if parts is not None:
            enc = type(enc)(parts.prepare_batch(dict(enc), self.model.config.video_token_id))
        enc = enc.to(self.model.device)
        float_dtype = next(self.model.parameters()).dtype
        for k in ("pixel_values", "pixel_values_videos"):
            if k in enc:
                enc[k] = enc[k].to(float_dtype)
        with torch.inference_mode():
            out = self.model.generate(
                **enc, max_new_tokens=items[0].max_new_tokens, pad_token_id=proc.tokenizer.pad_token_id,
                **_sampling_kwargs(items[0].temperature),
                **json_constraint_kwargs(self.model, proc.tokenizer, [it.json_schema for it in items]),
            )
        new = out[:, enc["input_ids"].shape[1]:]
        decoded = [t.strip() for t in proc.tokenizer.batch_decode(new, skip_special_tokens=True)]
        return [parts.from_model_text(t) for t in decoded] if parts is not None else decoded


# ----------------------------------------------------------------------------------------------------------
# OpenAI-compatible backend
# ----------------------------------------------------------------------------------------------------------
def openai_messages(spec: VlmSpec, req: VlmRequest, schema_in_prompt: bool,
                    video: Literal["images", "jpeg_frames", "mp4"] = "images") -> list[dict]:
    """OpenAI-format chat messages of a request, shared by the endpoint and the in-process vLLM backends. Images go
    as JPEG data URLs; a frame list given as a video goes in the ``video`` form:

    * ``images``: one image part per frame, after a line saying they are frames of one video;
    * ``jpeg_frames`` (in-process vLLM on a model that takes video): one ``video_url`` part, the frames as
      comma-separated base64 JPEGs in a ``data:video/jpeg`` URL, vLLM's own frame-list form, the rate from the
      engine's ``media_io_kwargs``;
    * ``mp4`` (``VlmSpec.endpoint_video``, for vLLM / SGLang servers): one ``video_url`` part, an H.264 MP4 at
      ``spec.video_fps``. vLLM and SGLang sample a decoded video for a Qwen-VL by Qwen's rule (at most 2 frames a
      second, an even number), so an odd frame list gets its last frame repeated, as Qwen-VL's processor pads it
      in the transformers backend; at the default 2 fps every frame sent reaches the model.

    In both video forms the model sees one video as the transformers backend gives it (Qwen2-VL: 3D patches over
    pairs of frames, about half the tokens of the same frames as images)."""
    content: list[dict] = []
    as_video = req.as_video and len(req.images) > 1
    if as_video and video == "jpeg_frames":
        urls = [encode_image_data_url(f, quality=spec.jpeg_quality, max_side_px=spec.max_image_side_px)
                for f in video_frames(req.images)]
        jpegs = [u.split(",", 1)[1] for u in urls]  # the base64 part of each data:image/jpeg URL
        content.append({"type": "video_url", "video_url": {"url": "data:video/jpeg;base64," + ",".join(jpegs)}})
    elif as_video and video == "mp4":
        frames = video_frames(req.images)
        if len(frames) % 2:  # as Qwen-VL's processor pads: the servers' Qwen-VL sampling would drop the last frame
            frames.append(frames[-1])
        url = encode_video_data_url(frames, spec.video_fps, max_side_px=spec.max_image_side_px)
        content.append({"type": "video_url", "video_url": {"url": url}})
    else:
        if as_video:
            line = f"The following {len(req.images)} images are frames of one video, in temporal order."
            content.append({"type": "text", "text": line})
        for im in req.images:
            url = encode_image_data_url(as_rgb_uint8(im), quality=spec.jpeg_quality, max_side_px=spec.max_image_side_px)
            content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": req.text})
    system = req.system
    if req.json_schema is not None and schema_in_prompt:
        system = f"{system}\n\n{schema_instruction(req.json_schema)}" if system else schema_instruction(req.json_schema)
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


class _VllmVlm:
    """In-process vLLM (experts.vllm_chat): every request of the call in one engine call (continuous batching),
    images as data URLs in the checkpoint's chat template (a frame list as one video where the model takes
    video), guided JSON decoding."""

    def __init__(self, spec: VlmSpec, cache: ResponseCacheLike | None) -> None:
        from experts.vllm_chat import VllmChat

        self.spec = spec
        self.chat = VllmChat(spec, cache)

    def run(self, requests: list[VlmRequest]) -> list[VlmResponse]:
        out: list[VlmResponse | None] = [None] * len(requests)
        index, calls = [], []
        video = "jpeg_frames" if self.chat.takes_video() else "images"
        for i, req in enumerate(requests):
            try:
                n, temp = generation_params(self.spec, req.max_new_tokens, req.temperature)
                calls.append((openai_messages(self.spec, req, schema_in_prompt=True, video=video), n, temp,
                              req.json_schema))
                index.append(i)
            except Exception as exc:  # an unreadable image fails its own item only
                out[i] = VlmResponse(None, describe_exception(exc), False, self.chat.model_name)
        for i, (text, err, cached) in zip(index, self.chat.run(calls)):
            out[i] = VlmResponse(text, err, cached, self.chat.model_name)
        return out  # type: ignore[return-value]


class _OpenAIVlm:
    def __init__(self, spec: VlmSpec, cache: ResponseCacheLike | None) -> None:
        self.spec = spec
        self.client = OpenAICompatClient(spec, cache)

    def messages_for(self, req: VlmRequest) -> list[dict]:
        return openai_messages(self.spec, req, schema_in_prompt=not self.spec.supports_json_schema,
                               video=self.spec.endpoint_video)

    def run(self, requests: list[VlmRequest]) -> list[VlmResponse]:
        calls: list[ChatCall] = []
        index: list[int] = []
        out: list[VlmResponse | None] = [None] * len(requests)
        for i, req in enumerate(requests):
            try:
                n, temp = generation_params(self.spec, req.max_new_tokens, req.temperature)
                calls.append(ChatCall(self.messages_for(req), openai_params(self.spec, n, temp, req.json_schema)))
                index.append(i)
            except Exception as exc:  # an unreadable image fails its own item only
                out[i] = VlmResponse(None, describe_exception(exc), False, self.spec.model_id)
        for i, r in zip(index, self.client.chat(calls)):
            out[i] = VlmResponse(r.text, r.error, r.cached, r.model)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.client.close()


# ----------------------------------------------------------------------------------------------------------
# Public expert
# ----------------------------------------------------------------------------------------------------------
class Vlm:
    def __init__(self, spec: VlmSpec, backend: Any) -> None:
        self.spec = spec
        self._backend = backend

    def generate(self, requests: list[VlmRequest]) -> list[VlmResponse]:
        """One response per request, in order; per-item failures carry ``error`` instead of raising."""
        if not requests:
            return []
        return self._backend.run(list(requests))

    def close(self) -> None:
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Vlm":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def vlm_from_loaded(model: Any, processor: Any, spec: VlmSpec, name: str | None = None) -> Vlm:
    """The expert around a model already in memory (a fine-tuned checkpoint with its adapter, say): same
    prompting and batched generation as :func:`load_vlm`, no loading or caching."""
    processor.tokenizer.padding_side = "left"  # batched generation continues every row at the right edge
    return Vlm(spec, _TransformersVlm(spec, loaded=(model.eval(), processor), name=name))


def load_vlm(spec: VlmSpec, cache: ResponseCacheLike | None = None) -> Vlm:
    """Build the expert for ``spec``. Transformers weights load once per process (``get_expert``); the
    response cache applies to the OpenAI-compatible backend."""
    if spec.backend == "openai":
        return Vlm(spec, _OpenAIVlm(spec, cache))
    if spec.backend == "vllm":
        return Vlm(spec, _VllmVlm(spec, cache))
    return Vlm(spec, _TransformersVlm(spec))
