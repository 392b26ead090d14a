#!/usr/bin/env bash
# Create .venv, install mini-engine with the CPU extras, and run the default job.
#   EXTRAS=onnx,dev (default) | gpu,dev on a CUDA machine
#   PYTHON=python3.11 to choose the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-onnx,dev}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# constraints.txt pins torch to the CPU build that this project's machines carry;
# without it pip would fetch the newest multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[${EXTRAS}]"
.venv/bin/mini-engine backends
if [ "${SKIP_DEMO:-0}" != 1 ]; then
  .venv/bin/mini-engine generate --model random:gpt2 --max-new-tokens 24 "Hello, my name is"
fi
