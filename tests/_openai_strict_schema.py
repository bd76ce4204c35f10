"""The OpenAI SDK's strict form of JSON schemas, printed as one JSON line. Runs in .venv-consumers
(scripts/setup_consumers.sh), with the SDK's own code: the routine its structured-output helpers
(``client.chat.completions.parse(response_format=Model)``) apply to a model's schema before sending it with
``strict: true``. The SDK has no public entry point for a plain dict schema, so this calls that routine,
``openai.lib._pydantic._ensure_strict_json_schema``, directly.

    python tests/_openai_strict_schema.py SCHEMAS.json [WORKDIR]

(WORKDIR, which tests/_engine_contract.run_contract passes, is not used.)
"""
from __future__ import annotations

import copy
import json
import sys

from openai.lib._pydantic import _ensure_strict_json_schema
import openai

schemas = json.loads(open(sys.argv[1]).read())
out = {}
for name, schema in schemas.items():
    s = copy.deepcopy(schema)
    out[name] = _ensure_strict_json_schema(s, path=(), root=s)
print(json.dumps({"openai": openai.__version__, "strict": out}))
