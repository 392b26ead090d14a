"""Attention over a pool of KV blocks in torch ops: any device, any float dtype.

The numba kernel (paged_attention.py) is the CPU float32 path; it reads the blocks in place.
This path is for what that kernel cannot run: bfloat16 / float16 pools and CUDA tensors. Each
layer gathers the blocks a step's rows use into a padded [rows, H, keys, D] tensor and runs one
attention over it, the static path's (`masked_attention`: SDPA on CUDA, matmul + softmax on CPU).

So the cache is copied once per layer and step (gathered, not grown): its cost grows with the
context, which the CPU float32 kernel avoids. Decode rows (one new token each) share one batched
call; a row with a longer chunk (a prefill) runs alone, so a 512-token prefill beside 15 decodes
does not pad the decodes' queries to 512.

Pool layout per layer, K and V alike: [num_blocks, n_head, block_size, head_dim], as the kernel's.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mini_engine.model.gpt2 import masked_attention


def allocate_pool_tensors(n_layer: int, num_blocks: int, n_head: int, block_size: int, head_dim: int,
                          dtype: torch.dtype, device: str):
    """(keys, values): one zeroed tensor per layer (zeroed: gathered padding keys stay finite)."""
    shape = (num_blocks, n_head, block_size, head_dim)
    keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
    values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
    return keys, values


class _Group:
    """Rows attended in one call: their queries padded to the longest, their blocks gathered."""

    def __init__(self, rows: np.ndarray, step, device: str, dtype: torch.dtype):
        qs, ctx, bs = step.query_start, step.context_lens, step.block_size
        q_len = (qs[rows + 1] - qs[rows]).astype(np.int64)
        n_keys = ctx[rows] + q_len  # keys each row holds once this step's tokens are written
        self.max_q = int(q_len.max())
        width = -(-int(n_keys.max()) // bs)  # blocks of the longest row
        tables = np.maximum(step.block_tables[rows, :width], 0)  # -1 past a row's blocks: masked below
        # Token t of row r (its query at offset t) sees keys 0 .. ctx[r] + t.
        offsets = np.arange(self.max_q)
        limit = ctx[rows][:, None] + offsets[None, :]  # [R, max_q]
        keys = np.arange(width * bs)
        allowed = keys[None, None, :] <= limit[:, :, None]  # padded queries see >= key 0: no NaN
        # Where this group's tokens sit in the step (token order) and in the padded [R, max_q] grid.
        tok = np.concatenate([np.arange(qs[r], qs[r + 1]) for r in rows])
        grid_r = np.repeat(np.arange(len(rows)), q_len)
        grid_t = np.concatenate([np.arange(n) for n in q_len])
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
        self.tables, self.tok, self.grid_r, self.grid_t = to(tables), to(tok), to(grid_r), to(grid_t)
        allowed_t = to(allowed)[:, None]  # [R, 1, max_q, keys]
        self.mask = torch.zeros(allowed_t.shape, dtype=dtype, device=device)
        self.mask.masked_fill_(~allowed_t, torch.finfo(dtype).min)  # finite, as additive_mask's
        self.rows = len(rows)

    def attend(self, q, kp, vp, out, scale: float) -> None:
        """q [N, H, D] (the whole step); writes this group's rows of out [N, H, D]."""
        n_head, dim = q.shape[1], q.shape[2]
        if self.max_q == 1:  # decodes: one query per row, nothing to pad
            qp = q[self.tok][:, :, None]  # [R, H, 1, D]
        else:
            qp = q.new_zeros(self.rows, self.max_q, n_head, dim)
            qp[self.grid_r, self.grid_t] = q[self.tok]
            qp = qp.transpose(1, 2)  # [R, H, max_q, D]
        # [R, blocks, H, bs, D] -> [R, H, blocks * bs, D]
        k = kp[self.tables].transpose(1, 2).reshape(self.rows, n_head, -1, dim)
        v = vp[self.tables].transpose(1, 2).reshape(self.rows, n_head, -1, dim)
        y = masked_attention(qp, k, v, self.mask, scale)
        out[self.tok] = y[:, :, 0] if self.max_q == 1 else y.transpose(1, 2)[self.grid_r, self.grid_t]


class TorchPagedKV:
    """The KV cache argument of `GPT2.paged_step` over torch pool tensors (see PagedKV for numba)."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], step, head_dim: int):
        self.keys, self.values = keys, values
        device, dtype = str(keys[0].device), keys[0].dtype
        self.scale = 1.0 / math.sqrt(head_dim)
        bs = step.block_size
        slots = torch.from_numpy(np.ascontiguousarray(step.slot_mapping)).to(device)
        self.block, self.offset = slots // bs, slots % bs
        q_len = np.diff(step.query_start)
        decodes = np.flatnonzero(q_len == 1)
        self.groups = [_Group(decodes, step, device, dtype)] if decodes.size else []
        self.groups += [_Group(np.array([r]), step, device, dtype) for r in np.flatnonzero(q_len > 1)]

    def attend(self, layer: int, q, k, v):
        """q, k, v: [N, H, D] on the pool's device; returns the attention output [N, H, D]."""
        kp, vp = self.keys[layer], self.values[layer]
        # Two advanced indices around a slice: the indexed view is [N, H, D], as k and v are.
        kp[self.block, :, self.offset] = k.to(kp.dtype)
        vp[self.block, :, self.offset] = v.to(vp.dtype)
        out = torch.empty_like(q)
        for g in self.groups:
            g.attend(q, kp, vp, out, self.scale)
        return out
