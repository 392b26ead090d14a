"""Attention over a pool of KV blocks on CPU: a numba kernel that reads each row's own blocks.

Why a kernel: gathering a row's blocks into a contiguous tensor for torch's matmul copies
its whole context every step (read + write + read again), which at context 1000 costs more
than the decode step's weights. The kernel reads every cached K and V once, in place, so a
decode step at long context is bound by memory bandwidth (benchmarks/paged_kernel_probe.py,
result/cpu/paged_kernel_probe.md). Decodes, prefill chunks and mixed steps run in the same
call: a query at position p sees its row's keys 0..p.

Why this loop order (each measured against the one before it, benchmarks/paged_kernel_probe.py):
- A task walks a row's blocks once for all its heads, K and V of each block back to back, so
  reads go through a block in address order instead of restarting the prefetcher at every
  head's 4 KB slice; softmax is online (a running max and sum per head) so one pass suffices.
  Together 1.4-1.7x on one thread at context 1000 (result/cpu/paged_kernel_probe.md).
- The pool asks for transparent huge pages (this machine's THP is `madvise` only): the blocks of
  a pool in use lie in shuffled order, and 4 KB pages cost TLB misses on every block.
- Transposing K per block (so a block's scores are one vector loop over its keys) measured
  slower than a dot product over head_dim per key, and was dropped.

Threads: the work is split in shares of about equal keys read over plain Python threads running
the nogil kernel; a step whose tokens cannot balance the shares (fewer than 2 per thread, or one
long row among short ones) splits each token's heads too. numba's own layers measured worse
here: its OpenMP layer loads a second OpenMP runtime beside torch's (batch-1 decode fell from
~40-60 to 4.8 tok/s), and its workqueue layer ran 16 rows x 1000 tokens x 12 layers in ~95-119 ms
against ~72 ms for two plain threads.

Pool layout per layer, K and V alike: [num_blocks, n_head, block_size, head_dim], so one head's
slice of a block is contiguous. Float32 only.
"""
from __future__ import annotations

import math
import mmap

import numpy as np
from numba import njit


def allocate_pool(n_layer: int, num_blocks: int, n_head: int, block_size: int, head_dim: int):
    """(keys, values): one array per layer in the kernel's layout, on huge pages where the OS grants them.

    Anonymous memory is mapped on first write, so resident memory grows with the blocks in use,
    not with the pool's size: with huge pages, by each 2 MB region (~42 blocks of GPT-2 small's
    layer) that holds a written block; the pool's size (scheduler.kv_cache_mib) bounds it.
    """
    def one(shape):
        if not hasattr(mmap, "MAP_ANONYMOUS"):  # not a POSIX system: plain (lazily mapped) zeros
            return np.zeros(shape, np.float32)
        size = int(np.prod(shape)) * 4
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                buf.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # a kernel without THP: 4 KB pages, same results
                pass
        return np.frombuffer(buf, np.float32).reshape(shape)

    shape = (num_blocks, n_head, block_size, head_dim)
    keys = [one(shape) for _ in range(n_layer)]
    values = [one(shape) for _ in range(n_layer)]
    return keys, values


@njit(cache=True)
def write_kv(k, v, kpool, vpool, slots):
    """Store the new tokens' k, v [N, H, D] at pool slots (block * block_size + offset)."""
    bs = kpool.shape[2]
    for i in range(k.shape[0]):
        blk, off = slots[i] // bs, slots[i] % bs
        kpool[blk, :, off, :] = k[i]
        vpool[blk, :, off, :] = v[i]


@njit(nogil=True, fastmath=True, cache=True)
def attention_units(q, kpool, vpool, block_tables, rows, query_start, context_lens, scale, out, groups, lo, hi):
    """out[i, h] = softmax(q[i, h] . K[:p+1]) V[:p+1] over the blocks of token i's row, for the work
    units lo..hi-1: unit u is token u // groups, its heads' share u % groups of `groups` equal shares;
    `rows[i]` is token i's row."""
    n_tok, n_head, dim = q.shape
    bs = kpool.shape[2]
    s = np.empty(bs, np.float32)
    qs = np.empty((n_head, dim), np.float32)
    acc = np.empty((n_head, dim), np.float32)
    best = np.empty(n_head, np.float32)
    total = np.empty(n_head, np.float32)
    for u in range(lo, hi):
        i = u // groups
        g = u - i * groups
        h0 = g * n_head // groups
        h1 = (g + 1) * n_head // groups
        r = rows[i]
        n = context_lens[r] + (i - query_start[r]) + 1
        for h in range(h0, h1):
            for d in range(dim):
                qs[h, d] = q[i, h, d] * scale
                acc[h, d] = 0.0
            best[h] = -3.0e38
            total[h] = 0.0
        for j in range((n + bs - 1) // bs):
            blk = block_tables[r, j]
            m = min(bs, n - j * bs)
            for h in range(h0, h1):
                kb, qh = kpool[blk, h], qs[h]
                hi_s = np.float32(-3.0e38)
                for o in range(m):
                    x = np.float32(0.0)
                    for d in range(dim):
                        x += qh[d] * kb[o, d]
                    s[o] = x
                    hi_s = max(hi_s, x)
                mx, ah = best[h], acc[h]
                if hi_s > mx:  # a new running max: rescale what this head has summed so far
                    c = np.float32(math.exp(mx - hi_s))
                    total[h] *= c
                    for d in range(dim):
                        ah[d] *= c
                    best[h] = mx = hi_s
                vb = vpool[blk, h]
                t = total[h]
                for o in range(m):
                    p = np.float32(math.exp(s[o] - mx))
                    t += p
                    for d in range(dim):
                        ah[d] += p * vb[o, d]
                total[h] = t
        for h in range(h0, h1):
            inv = np.float32(1.0) / total[h]
            for d in range(dim):
                out[i, h, d] = acc[h, d] * inv


# Below this many keys read per layer (all heads), splitting costs more (a thread hand-off) than it
# saves: batch-1 decode at context 1000 (12k keys) ran 1.3x slower on two threads than on one
# (result/cpu/paged_kernel_probe.md).
MIN_SPLIT_KEYS = 20_000
_POOLS: dict = {}


def split_units(query_start: np.ndarray, context_lens: np.ndarray, n_head: int, threads: int):
    """Token -> row, head groups per token, and the unit ranges of `threads` shares of about equal keys.

    The same for every layer of a step, so a step computes it once.
    """
    per_row = np.diff(query_start)
    n_tok = int(query_start[-1])
    rows = np.repeat(np.arange(len(context_lens)), per_row)
    # Keys read per token: the row's context plus the token's offset in its chunk, plus itself.
    keys = context_lens[rows] + (np.arange(n_tok) - query_start[:-1][rows]) + 1
    total = int(keys.sum()) * n_head
    if threads < 2 or total < MIN_SPLIT_KEYS:
        return rows, 1, [0, n_tok]
    # Split each token's heads when tokens alone cannot balance the shares: too few of them, or one
    # (a long row beside short decodes) holding more than a share's worth of keys.
    groups = min(threads, n_head) if n_tok < 2 * threads or int(keys.max()) * threads > int(keys.sum()) else 1
    cum = np.cumsum(np.repeat(keys, groups))
    bounds = np.searchsorted(cum, [int(cum[-1]) * k // threads for k in range(1, threads)]) + 1
    return rows, groups, [0, *[int(b) for b in bounds], n_tok * groups]


def paged_attention(q, kpool, vpool, block_tables, rows, query_start, context_lens, scale, out, groups,
                    edges) -> None:
    """Every work unit, the shares between consecutive `edges` on threads of their own."""
    args = (q, kpool, vpool, block_tables, rows, query_start, context_lens, scale, out, groups)
    shares = len(edges) - 1
    futures = [_pool(shares).submit(attention_units, *args, edges[k], edges[k + 1]) for k in range(1, shares)]
    attention_units(*args, edges[0], edges[1])
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
        self.rows, self.groups, self.edges = split_units(step.query_start, step.context_lens, n_head, threads)

    def attend(self, layer: int, q, k, v):
        """q, k, v: torch [N, H, D] float32 on CPU; returns the attention output as torch [N, H, D]."""
        import torch

        qn, kn, vn = (np.ascontiguousarray(t.numpy()) for t in (q, k, v))
        return torch.from_numpy(self.attend_np(layer, qn, kn, vn))

    def attend_np(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        write_kv(k, v, self.keys[layer], self.values[layer], self.slots)
        out = np.empty_like(q)
        paged_attention(q, self.keys[layer], self.values[layer], self.tables, self.rows, self.query_start,
                        self.context_lens, self.scale, out, self.groups, self.edges)
        return out
