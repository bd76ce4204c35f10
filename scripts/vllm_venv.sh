#!/usr/bin/env bash
# A virtualenv with vLLM and its own pins (they clash with ours: torch, transformers, xgrammar), for
# tests/test_vllm_backend.py::test_against_vllms_own_code, which runs vLLM's own request validation, chat parser
# and structured-output backends on CPU. About 10 GB (vLLM's CUDA torch; 2.5 min to build here). Not part of
# scripts/setup.sh.
#
#   bash scripts/vllm_venv.sh [DIR]      # default .venv-vllm
#   MOTIONFORGE_VLLM_PYTHON=DIR/bin/python .venv/bin/python -m pytest -q tests/test_vllm_backend.py
#
# VLLM_VERSION picks the release (default 0.33.0: on 2026-12-02 the registry lacked flashinfer-python 0.7.3,
# which 0.34.0 pins).
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.venv-vllm}"
python3 -m venv "$dest"
"$dest/bin/pip" install -q "vllm==${VLLM_VERSION:-0.33.0}"
"$dest/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'in', '$dest')"
echo "MOTIONFORGE_VLLM_PYTHON=$(cd "$dest" && pwd)/bin/python"
