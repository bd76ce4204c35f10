"""benchmarks/bench_chat_backends.py's parts that run without vLLM: the random models have the published sizes, and
every request is a different prompt (the response cache and vLLM's prefix cache see no repeats)."""
from __future__ import annotations

import pytest

try:
    from tests._benchmarks import load_benchmark
except ImportError:  # tests/ on sys.path instead of the repository root
    from _benchmarks import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_chat_backends")


# The Qwen2.5 Instruct model cards: "Number of Parameters" and "(Non-Embedding)", in billions
PUBLISHED = {"0.5b": (0.49, 0.36), "1.5b": (1.54, 1.31), "7b": (7.61, 6.53)}


@pytest.mark.parametrize("shape", sorted(PUBLISHED))
def test_random_models_have_the_published_sizes(bench, shape):
    import torch
    from transformers import Qwen2ForCausalLM

    from experts.llm import build_tiny_qwen_tokenizer

    with torch.device("meta"):  # shapes only, no memory
        model = Qwen2ForCausalLM(bench.config(shape, build_tiny_qwen_tokenizer()))
    total = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    embeddings = model.model.embed_tokens.weight.numel() + (
        0 if model.config.tie_word_embeddings else model.lm_head.weight.numel())
    # within 0.01 B: the cards give two decimals, and not always rounded (7B: 7,615,616,512 parameters, "7.61B")
    assert total / 1e9 == pytest.approx(PUBLISHED[shape][0], abs=0.01)
    assert (total - embeddings) / 1e9 == pytest.approx(PUBLISHED[shape][1], abs=0.01)


def test_prompts_all_differ(bench):
    prompts = bench.prompts(64)
    assert len(set(prompts)) == 64 and all(p.startswith("Describe how ") for p in prompts)


def _args(**kw):
    from argparse import Namespace

    base = dict(requests=5, new_tokens=4, batch_size=2, repeats=2, device="cpu", vllm_share=0.3, enforce_eager=False)
    return Namespace(**{**base, **kw})


def test_child_times_every_repeat_on_the_transformers_backend(bench, tmp_path):
    from experts.base import clear_expert_cache
    from experts.llm import build_tiny_qwen2_lm

    build_tiny_qwen2_lm(tmp_path)
    clear_expert_cache()
    try:
        out = bench.child(_args(child="transformers", model=tmp_path))
    finally:
        clear_expert_cache()
    assert out["requests"] == 5 and out["errors"] == 0 and len(out["walls_s"]) == 2
    assert "finish_reasons" not in out  # transformers: the checkpoint decides, nothing to report


def test_child_reports_vllms_finish_reasons_and_never_serves_from_cache(bench, tmp_path, monkeypatch):
    """Through the stand-in vLLM (tests/test_vllm_backend.py): each timed call generates all its requests (the
    recording cache answers nothing, though the warm-up asked the same prompts), and every reply's finish reason
    reaches the report."""
    import sys

    from experts.base import clear_expert_cache

    try:
        from tests.test_vllm_backend import _StandInVllm
    except ImportError:
        from test_vllm_backend import _StandInVllm

    mod = _StandInVllm(lambda messages, params: "words")
    monkeypatch.setitem(sys.modules, "vllm", mod)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", mod.submodule)
    clear_expert_cache()
    try:
        out = bench.child(_args(child="vllm", model=tmp_path))
    finally:
        clear_expert_cache()
    assert [len(messages) for messages, _ in mod.calls] == [2, 5, 5]  # warm-up, then two full timed calls
    assert out["finish_reasons"] == {"stop": 10}  # the stand-in's replies, both timed calls
    assert mod.engines[0]["gpu_memory_utilization"] == 0.3 and mod.engines[0]["max_model_len"] == 2048


def test_child_serves_through_our_endpoint_backend_with_the_engine_flags(bench, tmp_path, monkeypatch):
    """The ``server`` child: the launcher gets the in-process engine's settings as vLLM server flags, and our
    endpoint backend sends every request of every timed call (here to the loopback stand-in server,
    tests/_fake_openai_server.py, in place of vLLM's), each reply's finish reason in the report."""
    import contextlib

    try:
        from tests._fake_openai_server import FakeOpenAIServer
    except ImportError:
        from _fake_openai_server import FakeOpenAIServer

    launched = []
    with FakeOpenAIServer() as srv:
        @contextlib.contextmanager
        def stand_in(python, model, name, engine, log_path):
            launched.append((model, name, bench.server_flags(engine)))
            yield srv.base_url

        monkeypatch.setattr(bench, "vllm_server", stand_in)
        out = bench.child(_args(child="server", model=tmp_path, enforce_eager=True))
    assert launched == [(str(tmp_path), "bench", ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.3",
                                                  "--max-model-len", "2048", "--enforce-eager"])]
    assert len(srv.requests) == 2 + 2 * 5  # warm-up, then two full timed calls: nothing served from a cache
    assert {r["model"] for r in srv.requests} == {"bench"} and {r["max_tokens"] for r in srv.requests} == {4}
    assert out["errors"] == 0 and out["finish_reasons"] == {"stop": 10} and len(out["walls_s"]) == 2


def test_server_flags_are_the_engine_arguments_as_vllms_command_line(bench):
    """An engine argument ``a_b=v`` is vLLM's ``--a-b v``; ``True`` a bare switch; a dict (a config group such as
    ``structured_outputs_config``) its JSON, as vLLM's server parses those."""
    assert bench.server_flags({"max_model_len": 4096, "enforce_eager": True, "gpu_memory_utilization": 0.1,
                               "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}) \
        == ["--max-model-len", "4096", "--enforce-eager", "--gpu-memory-utilization", "0.1",
            "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
