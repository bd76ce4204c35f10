#!/usr/bin/env bash
# A virtualenv with a serving engine and its own pins (they clash with ours: torch, transformers, xgrammar), for
# the tests that run our requests through that engine's own code on CPU (no GPU, no engine started):
#   vllm    tests/test_vllm_backend.py::test_against_vllms_own_code   (MOTIONFORGE_VLLM_PYTHON)
#   sglang  tests/test_expert_llm.py::test_against_sglangs_own_code   (MOTIONFORGE_SGLANG_PYTHON)
# About 10 GB each (their CUDA torch); 2.5-3 min to build here. Not part of scripts/setup.sh.
#
#   bash scripts/engine_venv.sh vllm|sglang [DIR]      # default .venv-vllm / .venv-sglang
#   MOTIONFORGE_VLLM_PYTHON=DIR/bin/python .venv/bin/python -m pytest -q tests/test_vllm_backend.py
#
# VERSION picks the release: default vLLM 0.33.0 (on 2026-12-02 the registry lacked flashinfer-python 0.7.3,
# which vLLM 0.34.0 pins) and SGLang 0.5.23.
set -euo pipefail
cd "$(dirname "$0")/.."
engine="${1:?usage: engine_venv.sh vllm|sglang [DIR]}"
case "$engine" in
  vllm) req="vllm==${VERSION:-0.33.0}"; var=MOTIONFORGE_VLLM_PYTHON ;;
  sglang) req="sglang==${VERSION:-0.5.23}"; var=MOTIONFORGE_SGLANG_PYTHON ;;
  *) echo "engine_venv.sh: unknown engine '$engine' (vllm or sglang)" >&2; exit 2 ;;
esac
dest="${2:-.venv-$engine}"
python3 -m venv "$dest"
"$dest/bin/pip" install -q "$req"
"$dest/bin/python" -c "import importlib.metadata as m; print('$engine', m.version('$engine'), 'in', '$dest')"
echo "$var=$(cd "$dest" && pwd)/bin/python"
