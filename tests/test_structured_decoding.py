"""JSON-schema constrained decoding (xgrammar) in the in-process transformers backends.

The replies of random-weight miniatures are checked with the ``jsonschema`` package (an independent
validator, not our pydantic models), and the same prompts without a schema are shown NOT to give JSON, so
the constraint is what makes the difference.
"""
from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from experts.llm import LlmRequest, LlmSpec, load_llm
from experts.structured import MAX_REPEAT, one_line_text_pattern
from experts.vlm import VlmRequest, VlmSpec, load_vlm
from stages.imove_it.check import VERDICT_SCHEMA, parse_verdict
from stages.motionbench.ffilter import ANSWER_SCHEMA, judge_letter
from stages.motionbench.qgen import GeneratedQuestions, decoding_schema


@pytest.fixture(scope="module")
def tiny_llm():
    return load_llm(LlmSpec(model_id="tiny://qwen2_lm", max_new_tokens=200, batch_size=4, device="cpu"))


@pytest.fixture(scope="module")
def tiny_vlm():
    return load_vlm(VlmSpec(model_id="tiny://qwen2_vl", max_new_tokens=48, batch_size=4, device="cpu"))


def _not_json(text: str | None) -> bool:
    try:
        json.loads(text or "")
    except ValueError:
        return True
    return False


def test_qgen_schema_gives_valid_questions_first_time(tiny_llm):
    schema = decoding_schema(num_questions=1, max_chars=12)
    reqs = [LlmRequest(f"Write a question about clip {i}.", json_schema=schema) for i in range(3)]
    results = tiny_llm.generate_json(reqs, GeneratedQuestions, repair_retries=2)
    for r in results:
        jsonschema.validate(json.loads(r.raw), schema)
        assert r.error is None and r.attempts == 1, r.error  # no repair re-ask was needed
        q = r.value.questions[0]
        assert len(q.options) == 4 and q.answer in "ABCD"
    # without the schema the same random model does not write JSON at all
    [plain] = tiny_llm.generate([LlmRequest("Write a question about clip 0.", max_new_tokens=40)])
    assert _not_json(plain.text)


def test_schema_and_plain_requests_in_one_call_keep_their_order(tiny_llm):
    reqs = [LlmRequest("a", json_schema=ANSWER_SCHEMA, max_new_tokens=20), LlmRequest("b", max_new_tokens=20),
            LlmRequest("c", json_schema=ANSWER_SCHEMA, max_new_tokens=20)]
    out = tiny_llm.generate(reqs)
    for i in (0, 2):
        jsonschema.validate(json.loads(out[i].text), ANSWER_SCHEMA)
    assert _not_json(out[1].text)


def test_first_frame_judge_and_checker_replies_follow_their_schemas(tiny_vlm):
    frame = (np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)
    judge = tiny_vlm.generate([VlmRequest("Which option? A. x B. y C. z D. w", images=(frame,), max_new_tokens=16,
                                          json_schema=ANSWER_SCHEMA)])[0]
    value = json.loads(judge.text)
    jsonschema.validate(value, ANSWER_SCHEMA)
    assert judge_letter(judge.text) == value["answer"]
    check = tiny_vlm.generate([VlmRequest("Is the caption correct?", images=(frame, frame), json_schema=VERDICT_SCHEMA,
                                          max_new_tokens=400)])[0]
    jsonschema.validate(json.loads(check.text), VERDICT_SCHEMA)
    correct, unique, _ = parse_verdict(check.text)
    assert correct is not None and unique is not None


def test_judge_letter_reads_structured_and_free_replies():
    assert judge_letter('{"answer": "C"}') == "C"
    assert judge_letter("B. He turns") == "B"
    assert judge_letter('{"answer": "none"}') is None
    assert judge_letter('{"choice": "B"}') == "B"  # not the schema's key: free-text reading still finds the cue


def test_checker_verdict_read_from_cut_or_control_character_replies():
    assert parse_verdict('{"correct": "yes", "unique": "no", "reason": "cut sho')[:2] == (True, False)
    assert parse_verdict('{"correct": "no", "unique": "yes", "reason": "a\x16b"}') == (False, True, "a\x16b")


def test_qgen_decoding_schema_agrees_with_the_validator():
    schema = decoding_schema(num_questions=6, max_chars=300)
    good = {"questions": [{"question": "What does the man do first?", "options": ["Waves", "Sits", "Runs", "Jumps"],
                           "answer": "A", "content_dimensions": ["1.1"], "logic_dimension": 3, "explanation": None}]}
    jsonschema.validate(good, schema)
    GeneratedQuestions.model_validate(good)
    for bad in ({"options": ["Waves", "Sits", "Runs"]}, {"answer": "E"}, {"content_dimensions": ["9.9"]},
                {"logic_dimension": 5}, {"question": " leading blank"}, {"options": ["x" * 301, "a", "b", "c"]}):
        item = {**good["questions"][0], **bad}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"questions": [item]}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"questions": good["questions"] * 13}, schema)


@pytest.mark.parametrize("llm_spec, enforced", [
    (LlmSpec(model_id="gpt-4o", backend="openai"), False),  # the schema stays in the prompt, requests unchanged
    (LlmSpec(model_id="served", backend="openai", supports_json_schema=True), True),  # response_format
    (LlmSpec(model_id="tiny://qwen2_lm"), True),  # xgrammar in-process
])
def test_qgen_sends_the_decoding_schema_only_where_it_is_enforced(tmp_path, llm_spec, enforced):
    from schemas.descriptions import SCHEMA as DESC_SCHEMA, Description
    from stages.base import ShardContext, clear_expert_overrides, install_expert_override
    from stages.motionbench import qgen
    from storage.root import OutputRoot
    from tests._mb_doubles import scripted_llm, seed_stage

    root = OutputRoot(tmp_path / "out")
    seed_stage(root, "describe", DESC_SCHEMA, {0: [Description(
        clip_id="c1", video_id="v1", video_path="/v.mp4", start_s=0.0, end_s=1.0,
        dynamic_description="A man waves twice.", source="vlm")]})
    llm, backend = scripted_llm(lambda messages, attempt: "not json")
    seen = []
    real_run = backend.run
    backend.run = lambda items: (seen.extend(items), real_run(items))[1]
    install_expert_override("qgen.llm", llm)
    try:
        cfg = qgen.QgenConfig(llm=llm_spec, repair_retries=0)
        rows = qgen.process(ShardContext(stage=qgen.STAGE, root=root, config=cfg, shard=0, input_shards=(0,)))
    finally:
        clear_expert_overrides()
    assert len(rows) == 1 and rows[0].status == "error"
    expected = decoding_schema(cfg.num_questions, cfg.decode_max_chars) if enforced else GeneratedQuestions.model_json_schema()
    assert seen[0].json_schema == expected


# xgrammar 0.2.8 (the version vLLM 0.33 and 0.34 pin) with its grammar cache on, as vLLM runs it, fails to compile
# a repetition bounded at 129 or more (`.{0,128}` compiles, `.{0,129}` does not: measured 2026-12-02 with vLLM
# 0.33.0's own XgrammarBackend, its own venv). Our pins carry xgrammar 0.2.9, which has no such limit, so the
# contract is checked here as the bound itself; the tests that use tests/_engine_contract.py replay vLLM's and
# SGLang's own code when given one.
_BOUND = re.compile(r"\{(\d+)(?:,(\d*))?\}")


def _patterns(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "pattern" and isinstance(v, str):
                yield v
            else:
                yield from _patterns(v)
    elif isinstance(node, list):
        for v in node:
            yield from _patterns(v)


@pytest.mark.parametrize("max_chars", [1, 2, 16, 128, 129, 130, 160, 256, 257, 258, 300, 385, 1000, 4000])
def test_one_line_text_pattern_is_the_plain_bound_spelled_for_vllms_xgrammar(max_chars):
    ours = re.compile(one_line_text_pattern(max_chars))
    plain = re.compile(rf"^\S.{{0,{max_chars - 1}}}$")  # the language we mean, in its obvious spelling
    texts = ["a" * n for n in range(max_chars + 3)]
    texts += [" " + "a" * (max_chars - 1), "\tab", "a\nb", "ab\n", "é" * max_chars, "x" + " " * (max_chars - 1)]
    assert [bool(ours.search(t)) for t in texts] == [bool(plain.search(t)) for t in texts]
    assert bool(ours.search("a" * max_chars)) and not ours.search("a" * (max_chars + 1))
    assert all(int(b or a) <= MAX_REPEAT for a, b in _BOUND.findall(ours.pattern))


def test_one_line_text_pattern_refuses_lengths_it_cannot_spell_within_the_limit():
    assert one_line_text_pattern(MAX_REPEAT * (MAX_REPEAT + 1)).count("{") > 1
    for bad in (0, MAX_REPEAT * (MAX_REPEAT + 1) + 1):
        with pytest.raises(ValueError):
            one_line_text_pattern(bad)


def test_one_line_text_pattern_compiles_and_bounds_the_reply_in_xgrammar():
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from experts.base import resolve_local

    tok = AutoTokenizer.from_pretrained(resolve_local("tiny://qwen2_lm", None))
    info = xgr.TokenizerInfo.from_huggingface(tok)
    compiler = xgr.GrammarCompiler(info, cache_enabled=True)  # as vLLM builds its compiler
    schema = {"type": "object", "properties": {"r": {"type": "string", "pattern": one_line_text_pattern(300)}},
              "required": ["r"]}
    grammar = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def accepted(text: str) -> bool:
        matcher = xgr.GrammarMatcher(grammar)
        return all(matcher.accept_token(i) for i in tok.encode(json.dumps({"r": text}), add_special_tokens=False))

    assert accepted("a" * 127) and accepted("a" * 128) and accepted("b" * 300)
    assert not accepted("a" * 301) and not accepted(" leading blank")


@pytest.mark.parametrize("num_questions, max_chars", [(1, 8), (6, 300), (20, 4000)])
def test_schemas_we_decode_against_bound_no_repetition_above_vllms_xgrammar_limit(num_questions, max_chars):
    schemas = [VERDICT_SCHEMA, ANSWER_SCHEMA, decoding_schema(num_questions, max_chars)]
    patterns = [p for s in schemas for p in _patterns(s)]
    assert len(patterns) >= 4  # the verdict's reason; qgen's question, options and explanation
    assert all(int(b or a) <= MAX_REPEAT for p in patterns for a, b in _BOUND.findall(p)), patterns
