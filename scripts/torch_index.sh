#!/usr/bin/env bash
# Which extra package index scripts/setup.sh gives pip for torch: the URL on stdout (nothing =
# none, pip's configured index alone), the reason on stderr.
#
# From the public index alone, torch==2.13.0 is the CUDA build with several GB of nvidia-*
# wheels, useless without an NVIDIA GPU; PyTorch publishes CPU-only wheels (2.13.0+cpu, which
# pip prefers to 2.13.0 when both are offered) on its own index. This project's machines reach
# only their configured index, where 2.13.0 already is a CPU build, so that index is added only
# when it answers: there the plain install runs exactly as before.
#
#   bash scripts/torch_index.sh        probe this machine (PYTHON: the interpreter for the probe)
#   . scripts/torch_index.sh; torch_index_decide HAS_GPU REACHABLE    the decision alone
#
# TORCH_INDEX=URL overrides (e.g. https://download.pytorch.org/whl/cu126); TORCH_INDEX=none adds
# no index. EXTRAS containing gpu counts as a GPU machine. TORCH_CPU_INDEX replaces the CPU index.

TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

# $1: 1 when the machine has an NVIDIA GPU; $2: 1 when $TORCH_CPU_INDEX answers.
torch_index_decide() {
  if [ -n "${TORCH_INDEX:-}" ]; then
    if [ "$TORCH_INDEX" = none ]; then
      echo "torch: TORCH_INDEX=none: from pip's configured index" >&2
    else
      echo "torch: from TORCH_INDEX=$TORCH_INDEX (and pip's configured index)" >&2
      echo "$TORCH_INDEX"
    fi
  elif [ "$1" = 1 ] || case ",${EXTRAS:-}," in *,gpu,*) true ;; *) false ;; esac; then
    echo "torch: NVIDIA GPU (or EXTRAS=gpu): the CUDA build from pip's configured index" >&2
  elif [ "$2" = 1 ]; then
    echo "torch: no NVIDIA GPU: the CPU-only build from $TORCH_CPU_INDEX" >&2
    echo "$TORCH_CPU_INDEX"
  else
    echo "torch: no NVIDIA GPU and $TORCH_CPU_INDEX cannot be reached: from pip's configured index" \
         "(a CPU build on this project's machines; if it downloads nvidia-* wheels, set TORCH_INDEX)" >&2
  fi
}

has_nvidia_gpu() {
  { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; } \
    || [ -e /dev/nvidia0 ]
}

index_reachable() {  # a few seconds at most, so a machine that cannot reach it does not wait
  "${PYTHON:-python3}" - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).read(1)
PY
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  gpu=0; reachable=0
  has_nvidia_gpu && gpu=1
  # Probe only when the answer matters.
  if [ -z "${TORCH_INDEX:-}" ] && [ $gpu = 0 ] && index_reachable "$TORCH_CPU_INDEX"; then reachable=1; fi
  torch_index_decide $gpu $reachable
fi
