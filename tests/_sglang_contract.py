"""Run by tests/test_expert_llm.py::test_against_sglangs_own_code with a Python that has SGLang (its own venv:
its pins clash with ours). Checks what our OpenAI-compatible backend sends against an SGLang server's own code,
on CPU:

* the request body we post (``response_format`` with a JSON schema, ``max_tokens``, ``seed``) goes through
  SGLang's ``ChatCompletionRequest`` and its ``to_sampling_params``, which hands the grammar backend the schema
  as a string;
* SGLang's default grammar backend (``XGrammarGrammarBackend``, with the xgrammar release SGLang pins) compiles
  that string for a tiny Qwen2 tokenizer, and its grammar object accepts a valid reply up to EOS and refuses an
  invalid one;
* a frame list our endpoint backend posts as one MP4 (``endpoint_video="mp4"``; the request built on our side) is
  read by SGLang's request model, its ``video_url`` decoded by SGLang's own ``load_video`` and sampled by its
  Qwen-VL video preprocessing, which picks frames by the video's rate: every frame we sent is kept.

Prints one JSON line of results.

    python tests/_sglang_contract.py IN.json WORKDIR
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def feed(grammar, tokens: list[int]) -> bool:
    """Whether SGLang's grammar object takes every token (its accept_token raises ValueError on a refused one)."""
    try:
        for t in tokens:
            grammar.accept_token(t)
    except ValueError:
        return False
    return True


def main() -> None:
    spec, work = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    from importlib.metadata import version

    from sglang.srt.constrained.base_grammar_backend import InvalidGrammarObject
    from sglang.srt.constrained.xgrammar_backend import XGrammarGrammarBackend
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest
    from transformers import AutoTokenizer

    from experts.llm import build_tiny_qwen2_lm

    lm_dir = work / "qwen2_lm"
    lm_dir.mkdir(parents=True, exist_ok=True)
    build_tiny_qwen2_lm(lm_dir)
    tok = AutoTokenizer.from_pretrained(str(lm_dir))
    backend = XGrammarGrammarBackend(tok, vocab_size=len(tok), model_eos_token_ids=[tok.eos_token_id])
    out: dict = {"sglang": version("sglang"), "xgrammar": version("xgrammar"), "schemas": {}}
    for name, case in spec["schemas"].items():
        body = case["openai_body"]
        params = ChatCompletionRequest.model_validate(body).to_sampling_params(stop=[], model_generation_config={})
        res = {"json_is_schema": json.loads(params["json_schema"]) == case["schema"],
               "seed": params["sampling_seed"], "max_new_tokens": params["max_new_tokens"]}
        grammar = backend.dispatch_json(params["json_schema"])
        if isinstance(grammar, InvalidGrammarObject):
            res["error"] = grammar.error_message[:300]
        else:
            res["good_accepted"] = feed(grammar, tok.encode(json.dumps(case["good"]), add_special_tokens=False))
            res["ends"] = feed(grammar, [tok.eos_token_id]) and bool(grammar.is_terminated())
            res["bad_accepted"] = feed(backend.dispatch_json(params["json_schema"]),
                                       tok.encode(json.dumps(case["bad"]), add_special_tokens=False))
        out["schemas"][name] = res

    import asyncio

    from sglang.srt.multimodal.processors.qwen_vl import preprocess_video
    from sglang.srt.utils.common import is_cpu, load_video

    # SGLang's video decode pins its frames for a GPU (a driver needed) unless it runs as its CPU engine, and its
    # multi-threaded decode pins them regardless: so the CPU engine's setting (taken here after the grammar checks,
    # whose imports it would send to the CPU kernels; is_cpu caches its answer) and one decoding thread
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    is_cpu.cache_clear()

    request = ChatCompletionRequest.model_validate(spec["mp4_body"])
    [video_part] = [p for p in request.messages[0].content if p.type == "video_url"]
    decoded = load_video(video_part.video_url.url, use_gpu=False)
    decoded._num_decode_threads = 1
    frames, meta = asyncio.run(preprocess_video(decoded, video_config={}))
    out["mp4"] = {"decoded_frames": len(decoded), "fps": float(decoded.avg_fps), "kept_frames": int(frames.shape[0]),
                  "metadata_fps": float(meta["fps"])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
