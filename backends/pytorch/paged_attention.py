"""Attention over a pool of KV blocks on CPU: a numba kernel that reads each row's own blocks.

Why a kernel: gathering a row's blocks into a contiguous tensor for torch's matmul copies
its whole context every step (read + write + read again), which at context 1000 costs more
than the decode step's weights. The kernel reads every cached K and V once, in place, so a
decode step at long context is bound by memory bandwidth (benchmarks/paged_kernel_probe.py,
result/cpu/paged_kernel_probe.md). Decodes, prefill chunks and mixed steps run in the same
call: a query at position p sees its row's keys 0..p.

Why this loop order and layout (each measured against the one before it, benchmarks/paged_kernel_probe.py,
result/cpu/paged_kernel_probe.md):
- A task walks a row's blocks once for all its heads, in address order, with an online softmax (a
  running max and sum per head) so one pass suffices: 1.4-1.7x on one thread at context 1000
  against a task per (token, head) reading 4 KB slices 48 KB apart.
- The pool is token-major, [num_blocks, block_size, n_head, head_dim]: a block's tokens lie front
  to back (3 KB each at GPT-2 small), whatever the context, and the backend asks for 128-token
  blocks (Runner.preferred_block_size). Each block is a jump to anywhere in the pool, which the
  prefetchers pay for; rarer jumps took 16 rows x 1000 tokens from 57-65 to 42-46 ms on two
  threads (head-major 16-token blocks -> token-major 128; 59-82 % of torch.sum's rate on the
  same bytes). With a head-major pool, large blocks had cost short contexts what they saved long
  ones: a row at context 64 then reads 12 separate pieces of each block.
- The pool asks for transparent huge pages (this machine's THP is `madvise` only): the blocks of
  a pool in use lie in shuffled order, and 4 KB pages cost TLB misses on every block.
- Tried and dropped (slower or no faster): K transposed per block, software prefetch of the next
  block (llvm.prefetch), 4- and 16-key unrolled V sums, scalar accumulators for the SLP vectorizer,
  the same loops in C (gcc -O3, target_clones); those probes were not kept.

Threads: the work is split in shares of whole tokens with about equal keys read, over plain
Python threads running the nogil kernel (see split_units for why a token's heads stay together).
numba's own layers measured worse here: its OpenMP layer loads a second OpenMP runtime beside
torch's (batch-1 decode fell from ~40-60 to 4.8 tok/s), and its workqueue layer ran 16 rows x
1000 tokens x 12 layers in ~95-119 ms against ~72 ms for two plain threads.

Float32 only.
"""
from __future__ import annotations

import math
import mmap

import numpy as np
from numba import njit


def allocate_pool(n_layer: int, num_blocks: int, n_head: int, block_size: int, head_dim: int):
    """(keys, values): one array per layer in the kernel's layout, on huge pages where the OS grants them.

    The pool is written once here: anonymous memory is mapped on first write, and a pool mapped
    block by block as traffic reaches new blocks makes a server's memory climb for as long as its
    pool has unused blocks, which looks like a leak. Written up front, resident memory is the
    pool's size (scheduler.kv_cache_mib) from the start and stays there.
    """
    def one(shape):
        if not hasattr(mmap, "MAP_ANONYMOUS"):  # not a POSIX system: plain zeros
            return np.zeros(shape, np.float32)
        size = int(np.prod(shape)) * 4
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                buf.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # a kernel without THP: 4 KB pages, same results
                pass
        arr = np.frombuffer(buf, np.float32).reshape(shape)
        arr.fill(0.0)
        return arr

    shape = (num_blocks, block_size, n_head, head_dim)
    keys = [one(shape) for _ in range(n_layer)]
    values = [one(shape) for _ in range(n_layer)]
    return keys, values


@njit(cache=True)
def write_kv(k, v, kpool, vpool, slots):
    """Store the new tokens' k, v [N, H, D] at pool slots (block * block_size + offset)."""
    bs = kpool.shape[1]
    for i in range(k.shape[0]):
        blk, off = slots[i] // bs, slots[i] % bs
        kpool[blk, off] = k[i]
        vpool[blk, off] = v[i]


@njit(nogil=True, fastmath=True, cache=True)
def attention_units(q, kpool, vpool, block_tables, rows, query_start, context_lens, scale, out, lo, hi):
    """out[i, h] = softmax(q[i, h] . K[:p+1]) V[:p+1] over the blocks of token i's row, for tokens
    lo..hi-1; `rows[i]` is token i's row. Per block: every head's scores, each head's running max
    and rescale, then V, all in the block's address order."""
    n_tok, n_head, dim = q.shape
    bs = kpool.shape[1]
    s = np.empty((bs, n_head), np.float32)
    qs = np.empty((n_head, dim), np.float32)
    acc = np.empty((n_head, dim), np.float32)
    best = np.empty(n_head, np.float32)
    total = np.empty(n_head, np.float32)
    block_best = np.empty(n_head, np.float32)
    for i in range(lo, hi):
        r = rows[i]
        n = context_lens[r] + (i - query_start[r]) + 1
        for h in range(n_head):
            for d in range(dim):
                qs[h, d] = q[i, h, d] * scale
                acc[h, d] = 0.0
            best[h] = -3.0e38
            total[h] = 0.0
        for j in range((n + bs - 1) // bs):
            blk = block_tables[r, j]
            m = min(bs, n - j * bs)
            kb = kpool[blk]
            for h in range(n_head):
                block_best[h] = -3.0e38
            for o in range(m):
                for h in range(n_head):
                    x = np.float32(0.0)
                    for d in range(dim):
                        x += qs[h, d] * kb[o, h, d]
                    s[o, h] = x
                    block_best[h] = max(block_best[h], x)
            for h in range(n_head):
                if block_best[h] > best[h]:  # a new running max: rescale what this head has summed so far
                    c = np.float32(math.exp(best[h] - block_best[h]))
                    total[h] *= c
                    for d in range(dim):
                        acc[h, d] *= c
                    best[h] = block_best[h]
            vb = vpool[blk]
            for o in range(m):
                for h in range(n_head):
                    p = np.float32(math.exp(s[o, h] - best[h]))
                    total[h] += p
                    for d in range(dim):
                        acc[h, d] += p * vb[o, h, d]
        for h in range(n_head):
            inv = np.float32(1.0) / total[h]
            for d in range(dim):
                out[i, h, d] = acc[h, d] * inv


# Below this many keys read per layer (all heads), splitting costs more (a thread hand-off) than it
# saves: batch-1 decode at context 1000 (12k keys) ran 1.3x slower on two threads than on one
# (result/cpu/paged_kernel_probe.md).
MIN_SPLIT_KEYS = 20_000
_POOLS: dict = {}


def split_units(query_start: np.ndarray, context_lens: np.ndarray, n_head: int, threads: int):
    """Token -> row, and the token ranges of up to `threads` shares of about equal keys read.

    Shares are whole tokens: a token's heads are never split, because in a token-major block each
    half of the heads is a strided half of every token, and that read 2-3x slower than one thread
    reading it all (result/cpu/paged_kernel_probe.md). A long row beside short decodes gets a share
    of its own. The same for every layer of a step, so a step computes it once.
    """
    per_row = np.diff(query_start)
    n_tok = int(query_start[-1])
    rows = np.repeat(np.arange(len(context_lens)), per_row)
    # Keys read per token: the row's context plus the token's offset in its chunk, plus itself.
    keys = context_lens[rows] + (np.arange(n_tok) - query_start[:-1][rows]) + 1
    cum = np.cumsum(keys)
    if threads < 2 or n_tok < 2 or int(cum[-1]) * n_head < MIN_SPLIT_KEYS:
        return rows, [0, n_tok]
    shares = min(threads, n_tok)
    bounds = np.searchsorted(cum, [int(cum[-1]) * k / shares for k in range(1, shares)], side="left") + 1
    edges = [0, *sorted({min(max(int(b), 1), n_tok - 1) for b in bounds}), n_tok]
    return rows, edges


def paged_attention(q, kpool, vpool, block_tables, rows, query_start, context_lens, scale, out, edges) -> None:
    """Every token, the shares between consecutive `edges` on threads of their own."""
    args = (q, kpool, vpool, block_tables, rows, query_start, context_lens, scale, out)
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
        self.rows, self.edges = split_units(step.query_start, step.context_lens, n_head, threads)

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
