"""Megatron-style split of the engine's GPT-2 for rank r of a tensor-parallel group.

Per block: the attention's c_attn (q, k and v) and the MLP's c_fc are column-parallel (rank r
keeps heads r*H/tp.. and the matching quarter of the MLP's hidden units), the attention's c_proj
and the MLP's c_proj are row-parallel (rank r keeps the matching input columns), and each
row-parallel output is summed over the ranks by one all-reduce: two per block per step. The
row-parallel biases are added once, by rank 0, inside the sum.

Embeddings: wte and wpe stay whole on every rank. A lookup reads only the step's rows, so a
vocab-split embedding would save memory but cost one more all-reduce of [N, d] per step.
lm_head (the tied wte, 50257 x d: the largest matrix, 31% of GPT-2 small's weight bytes) is
vocab-split: each rank computes logits for its share of the vocabulary and rank 0 gathers them
(what vLLM's ParallelLMHead does). A replicated lm_head would need no gather, but rank 0 would
read all of it while the others wait: on a memory-bound decode that alone caps TP=2 at
~1.5x (GPT-2 small) instead of 2x. Only rank 0 gets logits; the others return an empty tensor.
"""
from __future__ import annotations

import torch
from torch import nn


def shard_model(model, rank: int, tp: int, comm, linear: str = "auto") -> dict:
    """Slice `model` (a loaded float32 GPT2 on CPU) in place for `rank` of `tp`.

    `comm` (Comm) sums the row-parallel outputs and gathers the logits. `linear`: the
    TorchOptions.linear choice (onednn prepacks the sliced weights as the one-process path does).
    Returns facts for describe(): heads and vocabulary rows this rank holds, weight bytes.
    """
    cfg = model.cfg
    d, hd, heads = cfg.n_embd, cfg.head_dim, cfg.n_head // tp
    local = heads * hd  # this rank's width of q, k, v and of the attention output
    hidden = 4 * d // tp
    for block in model.h:
        attn, mlp = block.attn, block.mlp
        w, b = attn.c_attn.weight, attn.c_attn.bias  # [3d, d]: q, k, v rows, head after head
        rows = torch.cat([torch.arange(part * d + rank * local, part * d + (rank + 1) * local) for part in range(3)])
        attn.c_attn = _linear(w[rows], b[rows], linear)
        attn.n_head = heads
        attn.c_proj = RowParallel(_linear(attn.c_proj.weight[:, rank * local:(rank + 1) * local],
                                          attn.c_proj.bias if rank == 0 else None, linear), comm)
        mlp.c_fc = _linear(mlp.c_fc.weight[rank * hidden:(rank + 1) * hidden],
                           mlp.c_fc.bias[rank * hidden:(rank + 1) * hidden], linear)
        mlp.c_proj = RowParallel(_linear(mlp.c_proj.weight[:, rank * hidden:(rank + 1) * hidden],
                                         mlp.c_proj.bias if rank == 0 else None, linear), comm)
    head = VocabParallelHead(model.wte.weight, rank, tp, comm, linear)
    model.lm_head = head.forward  # a callable, not a submodule (see GPT2.lm_head)
    model._tp_head = [head]  # keeps its weights alive
    per_block = (3 * local * d + local * d + 2 * hidden * d) * 4
    return {"heads": heads, "vocab_rows": head.rows, "mlp_hidden": hidden,
            "weight_bytes_per_step": cfg.n_layer * per_block + head.rows * d * 4}


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str) -> nn.Module:
    """A Linear over the slice, with its own contiguous copy (the full weight is dropped)."""
    from ..linears import CpuLinear, onednn_usable

    weight = weight.detach().contiguous().clone()
    bias = None if bias is None else bias.detach().contiguous().clone()
    if mode != "aten" and onednn_usable():
        return CpuLinear(weight, bias)
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


class RowParallel(nn.Module):
    """A row-parallel Linear: this rank's partial product, then the sum over ranks."""

    def __init__(self, inner: nn.Module, comm):
        super().__init__()
        self.inner, self.comm = inner, comm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(self.inner(x).contiguous())


class VocabParallelHead:
    """Rank r's rows of the tied lm_head, padded to an equal share so the gather is uniform."""

    def __init__(self, wte: torch.Tensor, rank: int, tp: int, comm, linear: str):
        vocab, d = wte.shape
        share = -(-vocab // tp)
        lo, hi = rank * share, min((rank + 1) * share, vocab)
        weight = torch.zeros(share, d, dtype=wte.dtype)
        weight[:hi - lo] = wte[lo:hi]
        self.rows, self.vocab, self.comm = hi - lo, vocab, comm
        self.layer = _linear(weight, None, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        part = self.layer(x).contiguous()
        return self.comm.gather_logits(part, self.vocab)
