#!/usr/bin/env bash
# Idempotent set-up: ffmpeg and chromium from apt when missing, a virtualenv in .venv with pinned dependencies,
# and .venv-consumers with the outside tools the export tests run (scripts/setup_consumers.sh).
# A second run reuses .venv unless pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v ffmpeg >/dev/null || ! command -v ffprobe >/dev/null; then
  echo "[setup] installing ffmpeg" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ffmpeg >/dev/null
fi
# Chromium for the browser tests of `motionforge review serve` (driven by Playwright's Python package with this
# binary: nothing downloads a browser; never run `playwright install`).
if ! command -v chromium >/dev/null; then
  echo "[setup] installing chromium" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
PY=${PYTHON:-python3}
stamp_src=$(cat pyproject.toml $(ls constraints.txt 2>/dev/null) | sha256sum | cut -c1-16)
if [ -f .venv/.stamp ] && [ "$(cat .venv/.stamp)" = "$stamp_src" ]; then
  exec bash scripts/setup_consumers.sh  # outside tools the export tests run, in their own venv
fi
echo "[setup] creating .venv (first run takes a few minutes)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip install -q --disable-pip-version-check"
CONS=""; [ -f constraints.txt ] && CONS="-c constraints.txt"
$PIP --upgrade pip setuptools wheel
# The registry's torchvision 0.28 is linked against the standard torch build; '===' keeps pip from
# choosing the local '+cpu' build (see ENVIRONMENT.md).
$PIP $CONS "torch===2.13.0" "torchvision==0.28.0"
$PIP $CONS -e ".[test]"
# sam2 would otherwise build in an isolated env that downloads another torch.
SAM2_BUILD_CUDA=0 $PIP $CONS --no-build-isolation "sam2==1.1.0"
echo "$stamp_src" > .venv/.stamp
# Outside tools the export tests run (lmms-eval ...), in their own venv: they do not fit our pins.
bash scripts/setup_consumers.sh
