"""Language model expert: tiny transformers causal LM offline, OpenAI-compatible JSON output with repairs."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from pydantic import BaseModel, Field

from experts.base import WeightsNotFoundError, clear_expert_cache
from experts.llm import (
    JsonResult,
    LlmRequest,
    LlmResponse,
    LlmSpec,
    build_tiny_qwen2_lm,
    extract_json,
    load_llm,
    validate_json,
)
from storage.response_cache import ResponseCache

try:
    from tests._engine_contract import REPO, run_contract, schema_cases, skip_reason
except ImportError:  # tests/ on sys.path instead of the repository root
    from _engine_contract import REPO, run_contract, schema_cases, skip_reason

try:
    from tests._fake_openai_server import FakeOpenAIServer, Reply
except ImportError:  # tests/ on sys.path instead of the repository root
    from _fake_openai_server import FakeOpenAIServer, Reply

ENV = "MOTIONFORGE_TEST_LLM_KEY"


class Question(BaseModel):
    question: str
    options: list[str] = Field(min_length=4, max_length=4)
    answer: str = Field(pattern="^[ABCD]$")


GOOD = json.dumps({"question": "What moves first?", "options": ["car", "dog", "man", "ball"], "answer": "C"})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2_lm")
    build_tiny_qwen2_lm(out)
    return out


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    return load_llm(LlmSpec(model_id=str(tiny_dir), max_new_tokens=6, batch_size=4, device="cpu"))


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(ENV, "sk-llm-test-key-000000")


def openai_llm(srv, cache=None, **kw):
    spec = dict(model_id="fake-model", backend="openai", base_url=srv.base_url, api_key_env=ENV, max_retries=2,
                retry_initial_s=0.01, retry_max_s=0.02, timeout_s=5.0, max_concurrency=4)
    spec.update(kw)
    return load_llm(LlmSpec(**spec), cache)


# ------------------------------------------------------------------ transformers backend (tiny Qwen2) ---
def test_tiny_lm_generate_types_and_batching(tiny_llm):
    reqs = [LlmRequest("hello"), LlmRequest("the red car moves left", system="be brief"),
            LlmRequest("a much longer prompt about a dog that jumps twice and then turns around", max_new_tokens=3)]
    batch = tiny_llm.generate(reqs)
    assert len(batch) == 3 and all(isinstance(r, LlmResponse) for r in batch)
    assert all(r.error is None and isinstance(r.text, str) and r.cached is False for r in batch)
    assert batch[0].model == tiny_llm.spec.model_id
    singles = [tiny_llm.generate([r])[0] for r in reqs]
    assert [r.text for r in batch] == [r.text for r in singles]  # left padding does not change greedy output
    assert tiny_llm.generate(reqs) == batch  # greedy is deterministic
    assert tiny_llm.generate([]) == []


def test_tiny_lm_sampling_and_greedy_in_one_call(tiny_llm):
    import torch

    torch.manual_seed(0)
    greedy, sampled = tiny_llm.generate([LlmRequest("hello"), LlmRequest("hello", temperature=1.5)])
    assert greedy.error is None and sampled.error is None and isinstance(sampled.text, str)
    assert greedy.text == tiny_llm.generate([LlmRequest("hello")])[0].text  # not batched with the sampled one


def test_tiny_lm_through_tiny_scheme(tmp_path, monkeypatch):
    monkeypatch.setenv("MOTIONFORGE_TINY_CACHE", str(tmp_path))
    # an earlier test in this process may hold tiny://qwen2_lm in the expert cache: that one was built elsewhere
    clear_expert_cache()
    try:
        llm = load_llm(LlmSpec(model_id="tiny://qwen2_lm", max_new_tokens=4, device="cpu"))
        [r] = llm.generate([LlmRequest("hi")])
    finally:
        clear_expert_cache()
    assert r.error is None and isinstance(r.text, str)
    assert (tmp_path / "qwen2_lm" / "config.json").is_file()


def test_tiny_lm_json_exhausts_repairs_with_a_clear_error(tiny_llm):
    # a random model never writes valid JSON: the repair loop runs to its bound and says so
    [res] = tiny_llm.generate_json([LlmRequest("write a question")], Question, repair_retries=1)
    assert isinstance(res, JsonResult) and res.value is None and res.attempts == 2
    assert "Question" in res.error and "2 attempt" in res.error and res.raw is not None


def test_missing_local_weights_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_llm(LlmSpec(model_id=str(tmp_path / "no-such-checkpoint"), device="cpu"))


# ------------------------------------------------------------------ JSON helpers ------------------------
def test_extract_json_variants():
    assert extract_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('Sure! Here it is: {"a": [1, 2]} hope that helps') == {"a": [1, 2]}
    assert extract_json("[1, 2]") == [1, 2]
    with pytest.raises(ValueError, match="no JSON"):
        extract_json("no json here")
    with pytest.raises(ValueError, match="answer"):
        validate_json('{"question": "q", "options": ["a","b","c","d"], "answer": "E"}', Question)


# ------------------------------------------------------------------ OpenAI-compatible backend ----------
def test_openai_generate_and_params():
    with FakeOpenAIServer() as srv:
        llm = openai_llm(srv, max_new_tokens=33, temperature=0.5, seed=7)
        try:
            res = llm.generate([LlmRequest("hi", system="sys"), LlmRequest("yo", max_new_tokens=5, temperature=0.0)])
        finally:
            llm.close()
    assert [r.text for r in res] == ["echo: hi", "echo: yo"]
    # The two requests run concurrently: find each by its content, never by arrival order.
    by_user = {r["messages"][-1]["content"]: r for r in srv.requests}
    assert set(by_user) == {"hi", "yo"} and len(srv.requests) == 2
    a, b = by_user["hi"], by_user["yo"]
    assert a["messages"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert (a["max_tokens"], a["temperature"], a["seed"]) == (33, 0.5, 7)
    assert (b["max_tokens"], b["temperature"]) == (5, 0.0)


def test_malformed_json_then_valid_repair():
    with FakeOpenAIServer([Reply(content='Sure! {"question": "What moves", "options": [}'), Reply(content=GOOD)]) as srv:
        llm = openai_llm(srv)
        try:
            [res] = llm.generate_json([LlmRequest("Write one question.")], Question)
        finally:
            llm.close()
    assert res.error is None and res.attempts == 2
    assert isinstance(res.value, Question) and res.value.answer == "C" and res.raw == GOOD
    first, second = srv.requests
    assert "response_format" not in first  # endpoint not flagged as supporting json_schema
    assert '"options"' in first["messages"][0]["content"]  # so the schema is in the system prompt
    repair = second["messages"]
    assert repair[-2] == {"role": "assistant", "content": 'Sure! {"question": "What moves", "options": [}'}
    assert "could not be used" in repair[-1]["content"] and "JSON" in repair[-1]["content"]


def test_schema_violation_is_shown_to_the_model():
    bad = json.dumps({"question": "q", "options": ["a", "b"], "answer": "Z"})
    with FakeOpenAIServer([Reply(content=bad), Reply(content=GOOD)]) as srv:
        llm = openai_llm(srv)
        try:
            [res] = llm.generate_json([LlmRequest("q")], Question)
        finally:
            llm.close()
    assert res.value is not None and res.attempts == 2
    msg = srv.requests[1]["messages"][-1]["content"]
    assert "options" in msg and "answer" in msg


def test_repairs_are_bounded():
    with FakeOpenAIServer(lambda i, b: Reply(content="not json at all")) as srv:
        llm = openai_llm(srv)
        try:
            res = llm.generate_json([LlmRequest("a"), LlmRequest("b")], Question, repair_retries=2)
        finally:
            llm.close()
    assert len(srv.requests) == 6
    for r in res:
        assert r.value is None and r.attempts == 3 and r.raw == "not json at all"
        assert "no valid Question JSON after 3 attempt(s)" in r.error and "no JSON object" in r.error


def test_native_json_schema_response_format():
    with FakeOpenAIServer([Reply(content=GOOD)]) as srv:
        llm = openai_llm(srv, supports_json_schema=True, json_schema_strict=True, max_tokens_param="max_completion_tokens")
        try:
            [res] = llm.generate_json([LlmRequest("q", system="You write MotionBench questions.")], Question)
        finally:
            llm.close()
    assert res.value is not None and res.attempts == 1
    body = srv.requests[0]
    rf = body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "Question" and rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["required"] == ["question", "options", "answer"]
    assert rf["json_schema"]["schema"]["additionalProperties"] is False  # strict: the schema's strict form
    assert body["messages"][0]["content"] == "You write MotionBench questions."  # no schema text needed
    assert "max_completion_tokens" in body and "max_tokens" not in body


def test_transport_failure_in_generate_json_is_not_repaired():
    with FakeOpenAIServer(lambda i, b: Reply(400, "prompt too long")) as srv:
        llm = openai_llm(srv)
        try:
            [res] = llm.generate_json([LlmRequest("q")], Question)
        finally:
            llm.close()
    assert res.value is None and res.attempts == 1 and "request failed" in res.error and "HTTP 400" in res.error
    assert len(srv.requests) == 1


def test_generate_json_rerun_is_served_from_cache(tmp_path):
    cache = ResponseCache(str(tmp_path))
    with FakeOpenAIServer([Reply(content="{broken"), Reply(content=GOOD)]) as srv:
        for _ in range(2):
            llm = openai_llm(srv, cache)
            try:
                [res] = llm.generate_json([LlmRequest("q")], Question)
            finally:
                llm.close()
            assert res.value is not None and res.attempts == 2
        assert len(srv.requests) == 2  # the re-run, repair included, paid nothing


def test_strict_schema_form_is_the_openai_sdks(tmp_path):
    """With ``json_schema_strict`` the schema goes out in the form OpenAI requires for strict structured outputs.
    The oracle is the OpenAI SDK's own routine (tests/_openai_strict_schema.py, in .venv-consumers), run on every
    schema we decode against and on a plain pydantic model's schema."""
    import jsonschema

    from experts.openai_compat import strict_json_schema
    from stages.imove_it.check import VERDICT_SCHEMA
    from stages.motionbench.ffilter import ANSWER_SCHEMA
    from stages.motionbench.qgen import GeneratedQuestions, decoding_schema

    schemas = {"verdict": VERDICT_SCHEMA, "answer": ANSWER_SCHEMA, "qgen": decoding_schema(6, 300),
               "qgen_model": GeneratedQuestions.model_json_schema(), "question": Question.model_json_schema()}
    consumers_py = REPO / ".venv-consumers" / "bin" / "python"
    if not consumers_py.exists():
        pytest.fail(f"{consumers_py} missing: run scripts/setup_consumers.sh (scripts/setup.sh calls it)")
    sdk = run_contract(str(consumers_py), "_openai_strict_schema.py", schemas, tmp_path)
    assert sdk["openai"] == "3.54.0"
    for name, schema in schemas.items():
        before = json.loads(json.dumps(schema))
        ours = strict_json_schema(schema)
        assert ours == sdk["strict"][name], name
        assert schema == before, name  # the original is left as it was
    # what strictness changes for qgen: closed objects, every property required (explanation admits null)
    q = strict_json_schema(schemas["qgen"])["$defs"]["GeneratedQuestion"]
    assert q["additionalProperties"] is False and "explanation" in q["required"]
    assert "default" not in q["properties"]["explanation"]
    good = {"questions": [{"question": "What does the man do first?", "options": ["Waves", "Sits", "Runs", "Jumps"],
                           "answer": "A", "content_dimensions": ["1.1"], "logic_dimension": 3, "explanation": None}]}
    jsonschema.validate(good, strict_json_schema(schemas["qgen"]))


SGLANG_PYTHON = os.environ.get("MOTIONFORGE_SGLANG_PYTHON")


@pytest.mark.skipif(not SGLANG_PYTHON, reason=skip_reason("MOTIONFORGE_SGLANG_PYTHON", "SGLang"))
def test_against_sglangs_own_code(tmp_path):
    """The body our OpenAI-compatible backend posts with a JSON schema, read by an SGLang server's own request
    model, and every schema we decode against compiled by SGLang's default grammar backend with the xgrammar it
    pins; a frame list posted as one MP4 decoded and sampled by SGLang's own video code (tests/_sglang_contract.py,
    in SGLang's own venv; CPU is enough, no server is started)."""
    from experts.vlm import VlmRequest, VlmSpec, openai_messages

    frames = tuple(np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(7))
    mp4_spec = VlmSpec(model_id="tiny-vl", backend="openai", endpoint_video="mp4")
    mp4_body = {"model": "tiny-vl", "max_tokens": 8, "messages": openai_messages(
        mp4_spec, VlmRequest("How does it move?", images=frames, as_video=True), False, video="mp4")}
    out = run_contract(SGLANG_PYTHON, "_sglang_contract.py", {"schemas": schema_cases(), "mp4_body": mp4_body},
                       tmp_path)
    # 7 frames, sent as 8 (the last repeated) at the spec's video_fps (2): SGLang's Qwen-VL sampling (an even count,
    # at most 2 frames a second of the video) keeps them all; as 7 it would keep 6, and the same frames written at
    # 25 fps would be cut to its minimum of 4
    assert out["mp4"] == {"decoded_frames": 8, "fps": 2.0, "kept_frames": 8, "metadata_fps": 2.0}, out["mp4"]
    assert out["schemas"], out
    for name, res in out["schemas"].items():
        assert res == {"json_is_schema": True, "seed": 5, "max_new_tokens": 64, "good_accepted": True,
                       "ends": True, "bad_accepted": False}, (name, out["sglang"], out["xgrammar"], res)
