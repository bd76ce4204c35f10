"""Shared by the tests that run our requests through a serving engine's own code in that engine's venv
(test_vllm_backend.py::test_against_vllms_own_code, test_expert_llm.py::test_against_sglangs_own_code): the
schemas we decode against with a valid and an invalid reply each (both judged first by ``jsonschema``, an
independent validator), the request body our OpenAI-compatible backend posts for each, and the subprocess call
(also used to run the OpenAI SDK's strict-schema routine in .venv-consumers)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest

REPO = Path(__file__).resolve().parents[1]


def skip_reason(env_var: str, engine: str) -> str:
    return (f"{engine}'s pins clash with ours, so it lives in its own venv: bash scripts/engine_venv.sh "
            f"{engine.lower()} DIR, then {env_var}=DIR/bin/python")


def schema_cases() -> dict:
    from experts.llm import LlmSpec, openai_params
    from stages.imove_it.check import VERDICT_SCHEMA
    from stages.motionbench.ffilter import ANSWER_SCHEMA
    from stages.motionbench.qgen import decoding_schema

    question = {"question": "Which way does the car turn?", "options": ["Left", "Right", "Straight", "Back"],
                "answer": "A", "content_dimensions": ["1.1"], "logic_dimension": 2, "explanation": None}
    long = "The car slows, signals and then turns left " + "slowly " * 30  # past one 128-character block
    cases = {
        "ffilter": (ANSWER_SCHEMA, {"answer": "B"}, {"answer": "E"}),
        "check": (VERDICT_SCHEMA, {"correct": "yes", "unique": "no", "reason": long[:160]},
                  {"correct": "yes", "unique": "no", "reason": long[:161]}),
        "qgen": (decoding_schema(6, 300), {"questions": [{**question, "question": long[:300]}]},
                 {"questions": [{**question, "question": " leading blank"}]}),
        "qgen-4000": (decoding_schema(20, 4000), {"questions": [{**question, "question": (long * 20)[:4000]}]},
                      {"questions": [{**question, "question": (long * 20)[:4001]}]}),  # its largest setting
    }
    served = LlmSpec(model_id="served", backend="openai", supports_json_schema=True, seed=5)
    out = {}
    for name, (schema, good, bad) in cases.items():
        jsonschema.validate(good, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        body = {**openai_params(served, 64, 0.0, schema), "model": "served",
                "messages": [{"role": "user", "content": "Reply."}]}
        out[name] = {"schema": schema, "good": good, "bad": bad, "openai_body": body}
    return out


def run_contract(python: str, script: str, spec: dict, tmp_path: Path) -> dict:
    """Run tests/<script> with the engine's Python on ``spec``; its one JSON line of results."""
    (tmp_path / "in.json").write_text(json.dumps(spec))
    proc = subprocess.run([python, str(REPO / "tests" / script), str(tmp_path / "in.json"), str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
