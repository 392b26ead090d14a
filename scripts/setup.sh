#!/usr/bin/env bash
# Create .venv, install mini-engine with the CPU extras, and run the default job.
#   EXTRAS=onnx,dev,ray (default) | gpu,dev,ray on a CUDA machine | add ,peers for the int8 peer benchmarks
#   PYTHON=python3.11 to choose the interpreter
#   TORCH_INDEX=URL | none: the extra index for torch (default: scripts/torch_index.sh decides)
#   DRY_RUN=1 prints the install commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-onnx,dev,ray}
run() { if [ "${DRY_RUN:-0}" = 1 ]; then echo "+ $*"; else "$@"; fi; }
TORCH_EXTRA=$(PYTHON="$PY" EXTRAS="$EXTRAS" bash scripts/torch_index.sh)
INDEX_ARGS=()
[ -z "$TORCH_EXTRA" ] || INDEX_ARGS=(--extra-index-url "$TORCH_EXTRA")
[ -x .venv/bin/python ] || run "$PY" -m venv .venv
run .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
# constraints.txt pins torch==2.13.0 so that an open requirement cannot pull whatever build is
# newest; which build of 2.13.0 (CPU or CUDA) comes from the index chosen above.
run .venv/bin/python -m pip install -q --disable-pip-version-check ${INDEX_ARGS[@]+"${INDEX_ARGS[@]}"} \
  -c constraints.txt -e ".[${EXTRAS}]"
[ "${DRY_RUN:-0}" = 1 ] && exit 0
.venv/bin/mini-engine backends
if [ "${SKIP_DEMO:-0}" != 1 ]; then
  .venv/bin/mini-engine generate --model random:gpt2 --max-new-tokens 24 "Hello, my name is"
fi
