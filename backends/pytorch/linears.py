"""Fast fp32 Linear layers for CPU: weights reordered once for oneDNN.

On the AMD Zen 4 CPUs this project is measured on, steps are bound by how fast the
linear weights stream from memory (~500 MB per step for GPT-2 small) until batches
grow large: MKL's fp32 GEMV (plain `F.linear`) reads them at ~11-13 GB/s, oneDNN with
weights reordered at load time at ~13-19 GB/s, and oneDNN is the fastest GEMM here for
2 rows and more (batched decode, prefill; benchmarks/linear_kernels_bench.py). Steps
with one row and one token take the numpy path in row_step.py instead, unless the
backend option gemv is off.
"""
from __future__ import annotations

import torch
from torch import nn


# oneDNN keeps native memory for every distinct row count it has run a layer with (JIT kernels
# and primitives, beyond its primitive cache's own bound), and continuous batching makes steps of
# ever-new token counts: a server's memory would grow with the variety of its traffic. Row counts
# up to EXACT_ROWS (batched decodes) run as they are; larger ones (prefill chunks) are padded up
# to one of sixteen sizes per power of two, at most 1/16 more rows, so the distinct shapes, and
# the memory they hold, stay bounded (144 shapes up to 2048 rows).
EXACT_ROWS = 64


def bucket_rows(m: int) -> int:
    """The row count a oneDNN GEMM runs for m rows: m up to EXACT_ROWS, then the next multiple of
    a sixteenth of m's power of two (65 -> 68, 100 -> 100, 1000 -> 1024)."""
    if m <= EXACT_ROWS:
        return m
    step = 1 << (m.bit_length() - 5)
    return -(-m // step) * step


def pad_rows(x: torch.Tensor, rows: int, value=0) -> torch.Tensor:
    """x [m, k] with rows - m rows of `value` appended (x itself when m == rows)."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_full((rows - x.shape[0], x.shape[1]), value)])


class CpuLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.bias = None if bias is None else bias.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        m = x.shape[0]
        y = torch.ops.mkldnn._linear_pointwise(pad_rows(x, bucket_rows(m)), self.packed, self.bias, "none", [], "")
        return y[:m].view(*lead, y.shape[-1])


def onednn_usable() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def swap_linears(model: nn.Module, make) -> int:
    """Replace every nn.Linear of `model` by make(weight, bias); returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child.weight, child.bias))
                count += 1
    return count


def replace_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of the GPT-2 module, and its tied lm_head, for CpuLinear."""
    if not onednn_usable():
        return 0
    count = swap_linears(model, CpuLinear)
    head = CpuLinear(model.wte.weight, None)
    model.lm_head = head.forward  # a callable, not a submodule (see GPT2.lm_head)
    model._cpu_lm_head = [head]  # keep its weights alive
    return count + 1
