"""mini-engine: GPT-2-family inference on PyTorch, ONNX Runtime and TensorRT behind one interface.

Importing this package imports no deep-learning library; backends load theirs
when a runner is loaded.
"""
import os

# The torch backend runs batch-1 decode GEMVs on numpy's OpenBLAS between torch
# ops. OpenBLAS worker threads spin ~2^28 cycles (~70 ms) after each call by
# default, stealing a core from the torch work that follows (a prefill after
# decode steps ran 1.6-2.2x slower on 2 cores); 2^20 cycles (~0.3 ms) keeps them hot within
# a step and idle after it. Read when OpenBLAS loads, so set before numpy is imported.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")
# The same for torch's OpenMP (libgomp) workers, which spin ~300k pause loops (~5 ms here) after
# each parallel region: the paged-attention kernel's second thread then shares a core with a
# spinner. 10k keeps them hot between a step's torch ops: at batch 16, context 1000 the kernel
# took 43-52 ms instead of 70-80, and the step at context 64 did not change
# (result/cpu/long_context.md). Read when libgomp loads, so set before torch is imported. A set
# GOMP_SPINCOUNT overrides OMP_WAIT_POLICY in libgomp, so a user's wait policy is left alone.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .config import Config, load_config
from .errors import MiniEngineError
from .registry import list_backends
from .runner import Availability, Runner, RunnerConfig, StepInput
from .sampling import SamplingParams
from .sequence import Completion

__version__ = "0.1.0"


def __getattr__(name: str):
    # Engine pulls in the tokenizer (transformers); import it on first use.
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'mini_engine' has no attribute {name!r}")


__all__ = ["Engine", "Runner", "RunnerConfig", "StepInput", "Availability", "Config", "load_config",
           "list_backends", "SamplingParams", "Completion", "MiniEngineError", "__version__"]
