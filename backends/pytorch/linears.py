"""Fast fp32 Linear layers for CPU: oneDNN-prepacked weights, plus a BLAS GEMV for single rows.

On the AMD Zen 4 CPUs this project is measured on, a decode step is bound by how fast
the linear weights stream from memory (~500 MB per step for GPT-2 small):

- MKL's fp32 GEMV (plain `F.linear`) reads them at ~11-13 GB/s; oneDNN with weights
  reordered once at load time at ~13-19 GB/s, and it is the fastest GEMM here for
  2 rows and more (batched decode, prefill).
- For a single row (batch-1 decode), numpy's OpenBLAS GEMV reads ~17-26 GB/s: over a
  K-major copy of the weight where it has at least as many outputs as inputs, over the
  [N, K] weight where it has fewer (the MLP's down projection reads faster that way;
  benchmarks/linear_kernels_bench.py, "numpy, per shape"). It keeps a second copy of every
  weight, and it only pays when torch's own OpenMP threads are not spinning on the same
  cores: `GemvSwitch.engaged` runs such steps with one torch intra-op thread (BLAS brings
  its own threads).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class GemvSwitch:
    """Shared by one model's layers: while engaged, single-row inputs take the BLAS GEMV."""

    def __init__(self):
        self.active = False

    @contextmanager
    def engaged(self):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self.active = True
        try:
            yield
        finally:
            self.active = False
            torch.set_num_threads(threads)


class CpuLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, onednn: bool, gemv: GemvSwitch | None):
        super().__init__()
        weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.in_features = weight.shape[1]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None) if onednn else None
        self.weight = None if onednn else weight
        self.gemv = gemv
        if gemv is not None:
            self.n_major = weight.shape[0] < weight.shape[1]
            self.gemv_weight = (weight.contiguous() if self.n_major else weight.t().contiguous()).numpy()
            self.bias_np = None if bias is None else self.bias.numpy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv is not None and self.gemv.active and x.numel() == self.in_features:
            row = x.reshape(-1).numpy()
            y = self.gemv_weight @ row if self.n_major else row @ self.gemv_weight
            if self.bias_np is not None:
                y += self.bias_np
            return torch.from_numpy(y).view(*x.shape[:-1], -1)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def onednn_usable() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def replace_linears(model: nn.Module, onednn: bool, gemv: GemvSwitch | None) -> int:
    """Swap every nn.Linear of the GPT-2 module, and its tied lm_head, for CpuLinear."""
    onednn = onednn and onednn_usable()
    if not onednn and gemv is None:
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, CpuLinear(child.weight, child.bias, onednn, gemv))
                count += 1
    head = CpuLinear(model.wte.weight, None, onednn, gemv)
    model.lm_head = head.forward  # a callable, not a submodule (see GPT2.lm_head)
    model._cpu_lm_head = [head]  # keep its weights alive
    return count + 1
