"""Device memory, copies and the CUDA stream for the TensorRT runner.

The runner's logic exists once and talks to a `DeviceMemory`; this module
supplies two: pycuda (what the design brief names) and PyTorch CUDA tensors
(the fallback where pycuda is not installed; PyTorch is always present).
Everything is addressed as (buffer, byte offset) so that both stay simple.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np

from mini_engine.devices import module_installed
from mini_engine.errors import BackendUnavailable, ConfigError

CHOICES = ("auto", "pycuda", "torch")


@dataclass
class Buffer:
    ptr: int  # device address
    nbytes: int
    owner: Any  # keeps the allocation alive


class DeviceMemory(abc.ABC):
    name = "?"
    stream_handle: int = 0

    @abc.abstractmethod
    def alloc(self, nbytes: int) -> Buffer: ...

    @abc.abstractmethod
    def host_empty(self, shape, dtype) -> np.ndarray:
        """A page-locked host array (asynchronous copies need one)."""

    @abc.abstractmethod
    def upload(self, dst: Buffer, host: np.ndarray) -> None:
        """Host -> device at the start of `dst`, queued on the stream."""

    @abc.abstractmethod
    def download(self, host: np.ndarray, src: Buffer, offset: int = 0) -> None:
        """Device -> host, host.nbytes bytes from `src` + offset, queued on the stream."""

    @abc.abstractmethod
    def copy(self, dst: Buffer, dst_offset: int, src: Buffer, src_offset: int, nbytes: int) -> None: ...

    @abc.abstractmethod
    def synchronize(self) -> None: ...

    def close(self) -> None:
        pass


class PycudaMemory(DeviceMemory):
    name = "pycuda"

    def __init__(self, device_index: int):
        import pycuda.driver as cuda

        cuda.init()
        self.cuda = cuda
        # The primary context is the one the CUDA runtime (TensorRT, PyTorch) uses;
        # pycuda.autoinit would make a separate one.
        self.context = cuda.Device(device_index).retain_primary_context()
        self.context.push()
        self.stream = cuda.Stream()
        self.stream_handle = self.stream.handle

    def alloc(self, nbytes):
        mem = self.cuda.mem_alloc(max(nbytes, 1))
        return Buffer(int(mem), nbytes, mem)

    def host_empty(self, shape, dtype):
        return self.cuda.pagelocked_empty(shape, dtype)

    def upload(self, dst, host):
        self.cuda.memcpy_htod_async(dst.ptr, np.ascontiguousarray(host), self.stream)

    def download(self, host, src, offset=0):
        self.cuda.memcpy_dtoh_async(host, src.ptr + offset, self.stream)

    def copy(self, dst, dst_offset, src, src_offset, nbytes):
        self.cuda.memcpy_dtod_async(dst.ptr + dst_offset, src.ptr + src_offset, nbytes, self.stream)

    def synchronize(self):
        self.stream.synchronize()

    def close(self):
        if self.context is not None:
            self.context.pop()
            self.context = None


class TorchMemory(DeviceMemory):
    name = "torch"

    def __init__(self, device_index: int):
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailable("PyTorch sees no CUDA device (a CPU build?) and pycuda is not installed; "
                                     "install pycuda or a CUDA build of torch")
        self.torch = torch
        self.device = torch.device("cuda", device_index)
        self.stream = torch.cuda.Stream(self.device)
        self.stream_handle = self.stream.cuda_stream

    def _bytes(self, host: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(host).reshape(-1).view(np.uint8))

    def alloc(self, nbytes):
        t = self.torch.empty(max(nbytes, 1), dtype=self.torch.uint8, device=self.device)
        return Buffer(t.data_ptr(), nbytes, t)

    def host_empty(self, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        pinned = self.torch.empty(n, dtype=self.torch.uint8).pin_memory()
        return pinned.numpy().view(dtype).reshape(shape)

    def upload(self, dst, host):
        src = self._bytes(host)
        with self.torch.cuda.stream(self.stream):
            dst.owner[:src.numel()].copy_(src, non_blocking=True)

    def download(self, host, src, offset=0):
        out = self.torch.from_numpy(host.reshape(-1).view(np.uint8))
        with self.torch.cuda.stream(self.stream):
            out.copy_(src.owner[offset:offset + out.numel()], non_blocking=True)

    def copy(self, dst, dst_offset, src, src_offset, nbytes):
        with self.torch.cuda.stream(self.stream):
            dst.owner[dst_offset:dst_offset + nbytes].copy_(src.owner[src_offset:src_offset + nbytes],
                                                            non_blocking=True)

    def synchronize(self):
        self.stream.synchronize()


def make_memory(choice: str, device_index: int) -> DeviceMemory:
    """pycuda when installed (or asked for), else PyTorch CUDA tensors."""
    if choice not in CHOICES:
        raise ConfigError(f"backend.options.memory must be one of {', '.join(CHOICES)}, got '{choice}'")
    if choice == "pycuda" or (choice == "auto" and module_installed("pycuda")):
        if not module_installed("pycuda"):
            raise BackendUnavailable("backend.options.memory = 'pycuda' but pycuda is not installed "
                                     "(pip install pycuda, or use memory = 'torch')")
        return PycudaMemory(device_index)
    return TorchMemory(device_index)
