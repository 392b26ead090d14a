"""Cheap device discovery that imports no deep-learning library.

Listing backends must not import torch, onnxruntime or tensorrt just to learn
whether a GPU exists, so CUDA is probed through the driver library directly.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util


@functools.lru_cache(maxsize=None)
def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports, 0 when there is no driver."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def cuda_unavailable_reason() -> str | None:
    """None when a CUDA device is usable, else a sentence saying why not."""
    if cuda_device_count() > 0:
        return None
    return "no CUDA device (no NVIDIA driver or GPU on this machine)"


def package_version(*dist_names: str) -> str | None:
    """Installed version of the first distribution found, without importing it."""
    for name in dist_names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def module_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
