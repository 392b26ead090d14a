"""Attention over a pool of KV blocks on CPU: a numba kernel that reads each row's own blocks.

Why a kernel: gathering a row's blocks into a contiguous tensor for torch's matmul copies
its whole context every step (read + write + read again), which at context 1000 costs more
than the decode step's weights. The kernel reads every cached K and V once, in place, at
the memory bandwidth of a contiguous matmul (measured: 16 rows x 1000 tokens x 12 layers,
1.2 GB of cache, in ~40 ms vs ~30 ms for torch over contiguous buffers; at short contexts
it is faster than torch). One task per (query token, head), so decodes, prefill chunks and
mixed steps run in the same call: a query at position p sees its row's keys 0..p.

Pool layout per layer: [num_blocks, n_head, block_size, head_dim], so one head's slice of a
block is contiguous. Float32 only.
"""
from __future__ import annotations

import math
import os
import threading

import numba
import numpy as np
from numba import njit, prange

# numba's OpenMP layer loads a second OpenMP runtime beside torch's; both spin on the same two
# cores and a batch-1 decode step ran ~10x slower (4.8 vs 39-66 tok/s, measured). The
# workqueue layer's threads sleep between kernels. One engine thread launches the kernels.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"


@njit(cache=True)
def write_kv(k, v, kpool, vpool, slots):
    """Store the new tokens' k, v [N, H, D] at pool slots (block * block_size + offset)."""
    bs = kpool.shape[2]
    for i in range(k.shape[0]):
        blk, off = slots[i] // bs, slots[i] % bs
        kpool[blk, :, off, :] = k[i]
        vpool[blk, :, off, :] = v[i]


@njit(parallel=True, fastmath=True, cache=True)
def paged_attention(q, kpool, vpool, block_tables, query_start, context_lens, scale, out):
    """out[i, h] = softmax(q[i, h] . K[:p+1]) V[:p+1] over the blocks of token i's row."""
    n_tok, n_head, dim = q.shape
    bs = kpool.shape[2]
    rows = np.empty(n_tok, np.int64)
    for r in range(block_tables.shape[0]):
        for i in range(query_start[r], query_start[r + 1]):
            rows[i] = r
    for task in prange(n_tok * n_head):
        i = task // n_head
        h = task - i * n_head
        r = rows[i]
        n = context_lens[r] + (i - query_start[r]) + 1  # causal: keys up to this token
        scores = np.empty(n, np.float32)
        qv = q[i, h]
        best = np.float32(-3.0e38)
        t = 0
        for j in range((n + bs - 1) // bs):
            blk = block_tables[r, j]
            for o in range(min(bs, n - j * bs)):
                s = np.float32(0.0)
                for d in range(dim):
                    s += qv[d] * kpool[blk, h, o, d]
                s *= scale
                scores[t] = s
                if s > best:
                    best = s
                t += 1
        total = np.float32(0.0)
        for t in range(n):
            e = math.exp(scores[t] - best)
            scores[t] = e
            total += e
        acc = np.zeros(dim, np.float32)
        t = 0
        for j in range((n + bs - 1) // bs):
            blk = block_tables[r, j]
            for o in range(min(bs, n - j * bs)):
                w = scores[t]
                for d in range(dim):
                    acc[d] += w * vpool[blk, h, o, d]
                t += 1
        inv = np.float32(1.0) / total
        for d in range(dim):
            out[i, h, d] = acc[d] * inv


class PagedKV:
    """The KV cache argument of `GPT2.paged_step`: one step's view of the block pool."""

    def __init__(self, keys: list[np.ndarray], values: list[np.ndarray], step, n_head: int, head_dim: int):
        self.keys, self.values = keys, values
        self.n_head, self.head_dim = n_head, head_dim
        self.scale = np.float32(1.0 / math.sqrt(head_dim))
        self.slots = step.slot_mapping
        self.tables = step.block_tables
        self.query_start = step.query_start
        self.context_lens = step.context_lens

    def attend(self, layer: int, q, k, v):
        """q, k, v: torch [N, H, D] float32 on CPU; returns the attention output as torch [N, H, D]."""
        import torch

        qn, kn, vn = (np.ascontiguousarray(t.numpy()) for t in (q, k, v))
        return torch.from_numpy(self.attend_np(layer, qn, kn, vn))

    def attend_np(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        write_kv(k, v, self.keys[layer], self.values[layer], self.slots)
        out = np.empty_like(q)
        with _LAUNCH:
            paged_attention(q, self.keys[layer], self.values[layer], self.tables, self.query_start,
                            self.context_lens, self.scale, out)
        return out


# The workqueue layer aborts the process when two threads launch kernels at once (two engines in
# two threads): launches take turns.
_LAUNCH = threading.Lock()


def set_threads(n: int) -> int:
    """Run the kernel on `n` threads in the calling thread (numba's setting is per thread; 0 = one
    per core); returns the count used."""
    n = min(n or numba.config.NUMBA_NUM_THREADS, numba.config.NUMBA_NUM_THREADS)
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)
    return n
