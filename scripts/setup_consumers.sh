#!/usr/bin/env bash
# Idempotent: .venv-consumers, a second virtualenv holding the OUTSIDE tools whose real code the tests run:
# lmms-eval 0.7.3 (its motionbench task) and llamafactory 0.9.5 (its data loader) for tests/export/, and the
# OpenAI SDK 3.54.0 (the strict JSON-schema form its structured-output helpers send) for tests/test_expert_llm.py. They
# cannot go into .venv: lmms-eval requires av<16 and antlr4 4.7 (we pin av 18.1 and antlr4 4.9.3 for sam2's
# hydra config), llamafactory av<=16, datasets<=4, transformers<=5.6; see ENVIRONMENT.md.
#
# Both are installed with --no-deps: the tests import only modules whose third-party imports (datasets,
# pyarrow, transformers, av, ...) are already in .venv, which this venv sees through a .pth file placed AFTER
# its own site-packages (its own packages win). Only the small pure-Python extras those modules import are
# installed here (loguru for lmms-eval's task utils, jiter for the OpenAI SDK). Takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "[setup_consumers] run scripts/setup.sh first (.venv missing)" >&2; exit 1; }
REQS="lmms-eval==0.7.3 loguru==0.7.3 llamafactory==0.9.5 openai==3.54.0 jiter==0.19.0"
stamp_src=$(printf '%s\n' "$REQS" | cat - "$0" | sha256sum | cut -c1-16)
if [ -f .venv-consumers/.stamp ] && [ "$(cat .venv-consumers/.stamp)" = "$stamp_src" ]; then
  exit 0
fi
echo "[setup_consumers] creating .venv-consumers (lmms-eval, llamafactory for the export tests)" >&2
BASE=$(.venv/bin/python -c 'import sys; print(sys._base_executable)')
rm -rf .venv-consumers
"$BASE" -m venv .venv-consumers
.venv-consumers/bin/python -m pip install -q --disable-pip-version-check --no-deps $REQS
own=$(.venv-consumers/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
main=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$main" > "$own/zz_project_venv.pth"
echo "$stamp_src" > .venv-consumers/.stamp
