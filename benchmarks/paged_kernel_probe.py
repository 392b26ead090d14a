#!/usr/bin/env python
"""Probe: how fast the torch backend's paged-attention kernel reads its KV blocks, against the
kernel it replaced and against a plain streaming read of the same bytes.

Kernels, on the 12 layers of GPT-2 small, block 16, blocks in shuffled order as in a pool in use:
- before: one task per (token, head): it reads one head's 4 KB slice of each block of the row
  (the next slice it reads is 48 KB away), all K first, then all V after a softmax pass;
- shipped (backends/pytorch/paged_attention.py): a task walks a row's blocks once for all its
  heads, K and V of a block back to back, online softmax; the pool on transparent huge pages.
Both on 1 and 2 threads (2: tokens split by keys, or a single token's heads split in halves), and
torch.sum over one array of the same bytes: the read rate a well-vectorized loop reaches here.
The kernels run outside any torch op, as in a step only after torch's OpenMP workers stop
spinning (mini_engine sets GOMP_SPINCOUNT; see mini_engine/__init__.py).

    python benchmarks/paged_kernel_probe.py --rows 1 --context 1000 [--rounds 9] [--small-pages]
"""
import mini_engine  # noqa: F401 - before numpy (OpenBLAS settings)

import argparse
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit

import mini_engine_backends.pytorch.paged_attention as pa


@njit(nogil=True, fastmath=True)
def before(q, kpool, vpool, block_tables, rows, query_start, context_lens, scale, out, lo, hi):
    """The kernel before this one: task = token * n_head + head, K [blk, h, o, d]."""
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--small-pages", action="store_true",
                   help="the shipped kernel's pool as plain numpy arrays (4 KB pages unless THP is 'always')")
    a = p.parse_args()
    H, D, BS, L = 12, 64, 16, 12
    rng = np.random.default_rng(0)
    rows, ctx = a.rows, a.context
    per = (ctx + 1 + BS - 1) // BS
    nb = rows * per + 1
    # before: plain numpy arrays, as its pool shipped (4 KB pages where THP is `madvise`, as here).
    kp = [rng.standard_normal((nb, H, BS, D), dtype=np.float32) for _ in range(L)]
    vp = [rng.standard_normal((nb, H, BS, D), dtype=np.float32) for _ in range(L)]
    if a.small_pages:
        kt = [np.zeros((nb, H, BS, D), np.float32) for _ in range(L)]
        vt = [np.zeros((nb, H, BS, D), np.float32) for _ in range(L)]
    else:
        kt, vt = pa.allocate_pool(L, nb, H, BS, D)
    for layer in range(L):
        kt[layer][...] = kp[layer]
        vt[layer][...] = vp[layer]
    tables = rng.permutation(rows * per).astype(np.int32).reshape(rows, per)
    qs = np.arange(rows + 1, dtype=np.int32)
    cl = np.full(rows, ctx, np.int32)
    q = rng.standard_normal((rows, H, D), dtype=np.float32)
    sc = np.float32(1 / math.sqrt(D))
    rws = np.arange(rows)
    ex = ThreadPoolExecutor(1)

    def run_before(threads):
        o = np.empty_like(q)
        tasks = rows * H
        cut = tasks // 2
        for layer in range(L):
            args = (q, kp[layer], vp[layer], tables, rws, qs, cl, sc, o)
            if threads == 1:
                before(*args, 0, tasks)
            else:
                f = ex.submit(before, *args, cut, tasks)
                before(*args, 0, cut)
                f.result()
        return o

    def run_shipped(threads):
        o = np.empty_like(q)
        groups = 2 if threads == 2 and rows < 4 else 1
        units = rows * groups
        for layer in range(L):
            args = (q, kt[layer], vt[layer], tables, rws, qs, cl, sc, o, groups)
            if threads == 1:
                pa.attention_units(*args, 0, rows)
            else:
                f = ex.submit(pa.attention_units, *args, units // 2, units)
                pa.attention_units(*args, 0, units // 2)
                f.result()
        return o

    def rounds(fns: dict) -> dict:
        res = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(a.rounds):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                res[k].append(time.perf_counter() - t)
        return res

    print("max |before - shipped|:", float(np.abs(run_before(1) - run_shipped(1)).max()))
    res = rounds({f"{name} {t} thread{'s' if t > 1 else ''}": (lambda fn=fn, t=t: fn(t))
                  for name, fn in (("before", run_before), ("shipped", run_shipped)) for t in (1, 2)})
    # The reference last, in rounds of its own: torch's OpenMP workers then never share the cores
    # with the kernels' threads.
    import torch

    flat = torch.ones(rows * L * 2 * H * (ctx + 1) * D, dtype=torch.float32)

    def run_sum(threads):
        torch.set_num_threads(threads)
        flat.sum()
    res.update(rounds({f"torch.sum {t} thread{'s' if t > 1 else ''}": (lambda t=t: run_sum(t)) for t in (1, 2)}))
    mb = flat.numel() * 4 / 1e6
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip() if \
        __import__("os").path.exists("/sys/kernel/mm/transparent_hugepage/enabled") else "unknown"
    pages = "plain numpy arrays" if a.small_pages else "MADV_HUGEPAGE"
    pages += f"; THP setting: {thp}"
    print(f"rows {rows} x context {ctx}: K+V {mb:.0f} MB per step, shipped pool on {pages}, "
          f"median of {a.rounds} rounds (kernels alternating)")
    for k, v in res.items():
        m = statistics.median(v) * 1e3
        print(f"  {k:24s} {m:8.2f} ms  {mb / m:5.1f} GB/s")


if __name__ == "__main__":
    main()
