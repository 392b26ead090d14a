"""Attention over a pool of KV blocks on CPU: a numba kernel that reads each row's own blocks.

Why a kernel: gathering a row's blocks into a contiguous tensor for torch's matmul copies
its whole context every step (read + write + read again), which at context 1000 costs more
than the decode step's weights. The kernel reads every cached K and V once, in place. One task
per (query token, head), so decodes, prefill chunks and mixed steps run in the same call: a
query at position p sees its row's keys 0..p.

Threads: the tasks are split in shares of equal keys read over plain Python threads running
the nogil kernel. numba's own layers measured worse here: its OpenMP layer loads a second
OpenMP runtime beside torch's (batch-1 decode fell from ~40-60 to 4.8 tok/s), and its
workqueue layer ran 16 rows x 1000 tokens x 12 layers in ~95-119 ms against ~72 ms for two
plain threads and ~49 ms for its OpenMP layer alone. Inside a step the kernel still competes
with torch's OpenMP workers, which spin on the same cores after each torch op: with
OMP_WAIT_POLICY=PASSIVE that step took ~100 ms instead of ~190 ms (benchmarks/long_context_bench.py).

Pool layout per layer: [num_blocks, n_head, block_size, head_dim], so one head's slice of a
block is contiguous. Float32 only.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True)
def write_kv(k, v, kpool, vpool, slots):
    """Store the new tokens' k, v [N, H, D] at pool slots (block * block_size + offset)."""
    bs = kpool.shape[2]
    for i in range(k.shape[0]):
        blk, off = slots[i] // bs, slots[i] % bs
        kpool[blk, :, off, :] = k[i]
        vpool[blk, :, off, :] = v[i]


@njit(nogil=True, fastmath=True, cache=True)
def attention_tasks(q, kpool, vpool, block_tables, rows, query_start, context_lens, scale, out, lo, hi):
    """out[i, h] = softmax(q[i, h] . K[:p+1]) V[:p+1] over the blocks of token i's row, for the
    (token, head) tasks lo..hi-1 (task = token * n_head + head); `rows[i]` is token i's row."""
    n_tok, n_head, dim = q.shape
    bs = kpool.shape[2]
    for task in range(lo, hi):
        i = task // n_head
        h = task - i * n_head
        r = rows[i]
        n = context_lens[r] + (i - query_start[r]) + 1
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


# Below this many keys read, splitting costs more (a thread hand-off) than it saves.
MIN_SPLIT_KEYS = 20_000
_POOLS: dict = {}


def split_tasks(query_start: np.ndarray, context_lens: np.ndarray, n_head: int, threads: int):
    """Token -> row, and the (token, head) task ranges of `threads` shares of about equal keys to read.

    The same for every layer of a step, so a step computes it once.
    """
    per_row = np.diff(query_start)
    n_tok = int(query_start[-1])
    rows = np.repeat(np.arange(len(context_lens)), per_row)
    tasks = n_tok * n_head
    # Keys read per task: the row's context plus the token's offset in its chunk, plus itself.
    keys = np.repeat(context_lens[rows] + (np.arange(n_tok) - query_start[:-1][rows]) + 1, n_head)
    total = int(keys.sum())
    if threads < 2 or total < MIN_SPLIT_KEYS:
        return rows, [0, tasks]
    bounds = np.searchsorted(np.cumsum(keys), [total * k // threads for k in range(1, threads)]) + 1
    return rows, [0, *[int(b) for b in bounds], tasks]


def paged_attention(q, kpool, vpool, block_tables, rows, query_start, context_lens, scale, out, edges) -> None:
    """Every (token, head) task, the shares between consecutive `edges` on threads of their own."""
    args = (q, kpool, vpool, block_tables, rows, query_start, context_lens, scale, out)
    shares = len(edges) - 1
    futures = [_pool(shares).submit(attention_tasks, *args, edges[k], edges[k + 1]) for k in range(1, shares)]
    attention_tasks(*args, edges[0], edges[1])
    for f in futures:
        f.result()


def _pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor

    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="paged-attention")
    return _POOLS[threads]


class PagedKV:
    """The KV cache argument of `GPT2.paged_step`: one step's view of the block pool."""

    def __init__(self, keys: list[np.ndarray], values: list[np.ndarray], step, n_head: int, head_dim: int,
                 threads: int = 1):
        self.keys, self.values = keys, values
        self.scale = np.float32(1.0 / math.sqrt(head_dim))
        self.slots = step.slot_mapping
        self.tables = step.block_tables
        self.query_start = step.query_start
        self.context_lens = step.context_lens
        self.rows, self.edges = split_tasks(step.query_start, step.context_lens, n_head, threads)

    def attend(self, layer: int, q, k, v):
        """q, k, v: torch [N, H, D] float32 on CPU; returns the attention output as torch [N, H, D]."""
        import torch

        qn, kn, vn = (np.ascontiguousarray(t.numpy()) for t in (q, k, v))
        return torch.from_numpy(self.attend_np(layer, qn, kn, vn))

    def attend_np(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        write_kv(k, v, self.keys[layer], self.values[layer], self.slots)
        out = np.empty_like(q)
        paged_attention(q, self.keys[layer], self.values[layer], self.tables, self.rows, self.query_start,
                        self.context_lens, self.scale, out, self.edges)
        return out
