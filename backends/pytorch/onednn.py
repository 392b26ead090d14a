"""Run fp32 nn.Linear layers through oneDNN with prepacked weights (CPU).

On the AMD Zen 4 CPUs this project is measured on, MKL's fp32 GEMV streams
weights at ~12 GB/s; oneDNN with weights reordered once at load time reads
them faster, which is what bounds decode speed at small batch sizes.
"""
from __future__ import annotations

import torch
from torch import nn


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.bias = bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def onednn_usable() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def prepack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of the GPT-2 module, and its tied lm_head, for PackedLinear."""
    if not onednn_usable():
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                count += 1
    head = PackedLinear(model.wte.weight, None)
    model.lm_head = head.forward  # a callable, not a submodule (see GPT2.lm_head)
    model._packed_lm_head = [head]  # keep the packed weight alive
    return count + 1
