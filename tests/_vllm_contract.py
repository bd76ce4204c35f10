"""Run by tests/test_vllm_backend.py::test_against_vllms_own_code with a Python that has vLLM (its own venv:
vLLM's pins clash with ours). Checks our vLLM backend against vLLM's own code, on CPU:

* ``experts.vllm_chat.sampling_params`` right after a plain ``import vllm`` gives vLLM's SamplingParams with the
  schema as ``structured_outputs.json``;
* the engine arguments our backend passes go through vLLM's ``EngineArgs`` (as ``vllm.LLM`` hands them on) to a
  ``ModelConfig`` for tiny Qwen2-VL (our multimodal limits taken), Qwen2.5-VL, InternVL (HF layout) and Qwen2
  text checkpoints (the last with every ``vllm_engine`` option set), our structured-output settings make vLLM's
  ``StructuredOutputsConfig``, and the chat messages it sends parse with vLLM's own chat parser into the images
  and videos we sent (a frame list as one video on the Qwen models, whose architecture our backend reads from the
  ``model_config`` vLLM builds; as images on InternVL), and the MP4 our OpenAI-compatible backend posts for a frame
  list (``endpoint_video="mp4"``) reads, as a server with vLLM's default media settings reads it, into every frame
  at the spec's rate;
* every JSON schema we decode against (passed in, built on our side) passes vLLM's request validation, which
  names the backend vLLM's "auto" choice takes, both as our in-process backend hands it over and as the request
  body our OpenAI-compatible backend posts (``response_format``) reaches a vLLM server's request model; and it
  compiles in xgrammar and in guidance, each accepting a valid reply up to its end and refusing an invalid one,
  both as our engines set them up (compact output: the reply with blanks between tokens refused too) and as a
  vLLM server does by default.

``vllm.LLM`` is the one thing replaced: building an engine needs a GPU. Prints one JSON line of results.

    python tests/_vllm_contract.py IN.json WORKDIR
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _video(item) -> dict:
    """A video as vLLM's chat parser hands it on (a MediaWithBytes around frames and metadata): its frames' shape
    and the fps in its metadata."""
    frames, meta = getattr(item, "media", item)
    return {"shape": list(frames.shape), "fps": (meta or {}).get("fps")}


def main() -> None:
    spec, work = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    import numpy as np
    import vllm

    from experts.base import clear_expert_cache
    from experts.llm import LlmSpec, build_tiny_qwen2_lm, load_llm
    from experts.vlm import (VlmRequest, VlmSpec, build_tiny_internvl, build_tiny_qwen2_5_vl, build_tiny_qwen2_vl,
                             load_vlm)
    from experts.vllm_chat import sampling_params

    out: dict = {"vllm": vllm.__version__}
    probe = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    p = sampling_params(vllm, 16, 0.0, 3, probe)  # before anything imported vllm.sampling_params
    out["sampling_params"] = {"type": f"{type(p).__module__}.{type(p).__name__}", "max_tokens": p.max_tokens,
                              "seed": p.seed, "json": p.structured_outputs.json if p.structured_outputs else None}

    calls: dict = {"engines": [], "chats": []}
    from vllm.engine.arg_utils import EngineArgs

    class RecordingLLM:
        def __init__(self, **kw):
            calls["engines"].append(kw)
            self.model_config = EngineArgs(**kw).create_model_config()  # what vllm.LLM exposes, vLLM's own

        def chat(self, messages, params, use_tqdm=True):
            calls["chats"].append((messages, params))
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text="ok", finish_reason="stop")])
                    for _ in messages]

    vllm.LLM = RecordingLLM
    vl_dir, lm_dir = work / "qwen2_vl", work / "qwen2_lm"
    for d, build in ((vl_dir, build_tiny_qwen2_vl), (lm_dir, build_tiny_qwen2_lm)):
        d.mkdir(parents=True, exist_ok=True)
        build(d)
    clear_expert_cache()
    vlm = load_vlm(VlmSpec(model_id=str(vl_dir), backend="vllm", max_new_tokens=16))
    frame = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    replies = vlm.generate([VlmRequest("How does it move?", images=(frame,) * 3, as_video=True),
                            VlmRequest("Is it there?", images=(frame,), json_schema=probe, system="Be brief.")])
    out["replies"] = [[r.text, r.error] for r in replies]
    # a text-only model: its engine arguments too, with every engine option a spec can set
    load_llm(LlmSpec(model_id=str(lm_dir), backend="vllm", vllm_engine=spec["engine_options"]))
    others = {}  # the other VLM architectures we build: engine arguments and a video request each
    for name, build in (("qwen2_5_vl", build_tiny_qwen2_5_vl), ("internvl", build_tiny_internvl)):
        (work / name).mkdir(parents=True, exist_ok=True)
        build(work / name)
        clear_expert_cache()
        load_vlm(VlmSpec(model_id=str(work / name), backend="vllm")).generate(
            [VlmRequest("How does it move?", images=(frame,) * 2, as_video=True)])
        others[name] = (calls["engines"][-1], calls["chats"][-1][0][0])

    from vllm.config import StructuredOutputsConfig
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.chat_utils.chat_message import parse_chat_messages
    from vllm.tokenizers import get_tokenizer

    kw = dict(calls["engines"][0])
    out["engine_kwargs"] = kw
    mc = EngineArgs(**kw).create_model_config()
    out["mm_limits"] = {m: o.count for m, o in mc.multimodal_config.limit_per_prompt.items()}
    parsed = []
    for conversation in calls["chats"][0][0]:
        conv, mm, _ = parse_chat_messages(conversation, mc, "openai")
        texts = [part["text"] for c in conv for part in (c["content"] if isinstance(c["content"], list) else
                                                         [{"type": "text", "text": c["content"]}])
                 if isinstance(part, dict) and part.get("type") == "text"]
        images = [list(im.size) for im in (mm or {}).get("image", [])]
        parsed.append({"roles": [c["role"] for c in conv], "images": images, "texts": texts,
                       "videos": [_video(v) for v in (mm or {}).get("video", [])]})
    out["parsed"] = parsed
    # what our endpoint backend posts for a frame list with endpoint_video="mp4", as a vLLM server started without
    # media options reads it (an engine with vLLM's defaults: no media_io_kwargs of ours)
    # (built on our side: PyAV, which encodes it, is not in this venv)
    served_mc = EngineArgs(model=str(vl_dir)).create_model_config()
    _, mm, _ = parse_chat_messages(spec["mp4_messages"], served_mc, "openai")
    out["served_mp4"] = {"images": len((mm or {}).get("image", [])),
                         "videos": [_video(v) for v in (mm or {}).get("video", [])]}
    out["other_vlms"] = {}
    for name, (engine_kw, conversation) in others.items():
        other = EngineArgs(**engine_kw).create_model_config()
        _, mm, _ = parse_chat_messages(conversation, other, "openai")
        out["other_vlms"][name] = {"architectures": list(other.hf_config.architectures),
                                   "images": len((mm or {}).get("image", [])),
                                   "videos": [_video(v) for v in (mm or {}).get("video", [])]}

    from vllm.v1.structured_output.backend_guidance import GuidanceBackend
    from vllm.v1.structured_output.backend_types import StructuredOutputOptions
    from vllm.v1.structured_output.backend_xgrammar import XgrammarBackend

    lm = EngineArgs(**calls["engines"][1]).create_model_config()
    out["lm_engine_kwargs"] = calls["engines"][1]
    out["lm_max_model_len"] = lm.max_model_len
    # vllm.LLM turns this dict into its config object itself (EngineArgs above took it as it came); so do we
    so = StructuredOutputsConfig(**calls["engines"][1]["structured_outputs_config"])
    out["structured_outputs_config"] = {"backend": so.backend, "disable_any_whitespace": so.disable_any_whitespace}
    tok = get_tokenizer(str(lm_dir))

    def encode(reply, compact: bool) -> list[int]:
        return tok.encode(json.dumps(reply, separators=(",", ":") if compact else None), add_special_tokens=False)

    results = {}
    for name, case in spec["schemas"].items():
        schema = case["schema"]
        params = sampling_params(vllm, 64, 0.0, 1, schema)
        params._validate_structured_outputs(lm, StructuredOutputsConfig(), tok)
        res = {"auto_backend": params.structured_outputs._backend}
        # the body our OpenAI-compatible backend posts, as a vLLM server reads it
        served = ChatCompletionRequest.model_validate(case["openai_body"]).to_sampling_params(
            case["openai_body"]["max_tokens"], {})
        served._validate_structured_outputs(lm, StructuredOutputsConfig(), tok)
        res["served"] = {"json_is_schema": served.structured_outputs.json == schema, "seed": served.seed,
                         "max_tokens": served.max_tokens, "backend": served.structured_outputs._backend}
        # each grammar engine as our in-process engines set it up (compact: the good reply without blanks, and
        # the same reply with ", " / ": " refused) and as a vLLM server does by default (free whitespace)
        for backend_name, cls in (("xgrammar", XgrammarBackend), ("guidance", GuidanceBackend)):
            for setup, compact in (("ours", True), ("server", False)):
                # a VllmConfig needs a device; these backends read only these three fields of it
                so_cfg = StructuredOutputsConfig(backend=backend_name, disable_any_whitespace=compact)
                cfg = types.SimpleNamespace(model_config=lm, speculative_config=None, structured_outputs_config=so_cfg)
                try:
                    backend = cls(cfg, tokenizer=tok, vocab_size=lm.get_vocab_size())
                    good, bad, spaced = (backend.compile_grammar(StructuredOutputOptions.JSON, json.dumps(schema))
                                         for _ in range(3))
                    r = {"good_accepted": good.accept_tokens("good", encode(case["good"], compact)),
                         "ends": good.accept_tokens("good", [tok.eos_token_id]) and good.is_terminated(),
                         "bad_accepted": bad.accept_tokens("bad", encode(case["bad"], compact))}
                    if compact:
                        r["spaced_accepted"] = spaced.accept_tokens("spaced", encode(case["good"], False))
                    res[f"{backend_name}/{setup}"] = r
                except Exception as exc:  # noqa: BLE001 -- reported, the test names it
                    first_line = str(exc).splitlines()[0][:300]
                    res[f"{backend_name}/{setup}"] = {"error": f"{type(exc).__name__}: {first_line}"}
        results[name] = res
    out["schemas"] = results
    print(json.dumps(out))


if __name__ == "__main__":
    main()
