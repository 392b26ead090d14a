#!/usr/bin/env python
"""Probe: why the torch backend's paged-attention kernel reads its KV blocks at ~7-8 GB/s on one
core when a plain numba sum streams 22-27 GB/s here, and what one alternative task layout buys.

The kernel in backends/pytorch/paged_attention.py runs one task per (token, head): it walks a
row's blocks reading one head's [block_size, head_dim] slice of each (4 KB at block 16, a page of
its own, 48 KB from the next head's), so every slice starts a fresh prefetch stream. The variant
here (`kern_heads`) makes a task one token over a range of heads, so consecutive reads walk a
block's heads in address order. Single thread, the 12 layers of GPT-2 small, blocks in a shuffled
order as in a pool in use; the same numbers as the kernel (max |diff| printed).

    python benchmarks/paged_kernel_probe.py ROWS CONTEXT      # e.g. 1 1000, 16 1000
"""
import mini_engine  # noqa: F401 - before numpy (OpenBLAS settings)
import math, time, statistics, numpy as np, sys
from numba import njit

@njit(nogil=True, fastmath=True)
def kern_heads(q, kpool, vpool, block_tables, rows, query_start, context_lens, scale, out, lo, hi, h0, h1):
    """task = token; heads h0..h1-1 of it; reads each block's [h0:h1] slab (contiguous) once for K, once for V."""
    n_tok, n_head, dim = q.shape
    bs = kpool.shape[2]
    for i in range(lo, hi):
        r = rows[i]
        n = context_lens[r] + (i - query_start[r]) + 1
        nblk = (n + bs - 1) // bs
        nh = h1 - h0
        scores = np.empty((nh, nblk * bs), np.float32)
        best = np.full(nh, np.float32(-3.0e38))
        qs = np.empty((nh, dim), np.float32)
        for hh in range(nh):
            for d in range(dim):
                qs[hh, d] = q[i, h0 + hh, d] * scale
        for j in range(nblk):
            blk = block_tables[r, j]
            m = min(bs, n - j * bs)
            for hh in range(nh):
                kb = kpool[blk, h0 + hh]
                qv = qs[hh]
                for o in range(m):
                    s = np.float32(0.0)
                    for d in range(dim):
                        s += qv[d] * kb[o, d]
                    scores[hh, j * bs + o] = s
                    if s > best[hh]:
                        best[hh] = s
        acc = np.zeros((nh, dim), np.float32)
        for hh in range(nh):
            total = np.float32(0.0)
            b = best[hh]
            for t in range(n):
                e = np.float32(math.exp(scores[hh, t] - b))
                scores[hh, t] = e
                total += e
            scores[hh, :n] *= np.float32(1.0) / total
        for j in range(nblk):
            blk = block_tables[r, j]
            m = min(bs, n - j * bs)
            for hh in range(nh):
                vb = vpool[blk, h0 + hh]
                a = acc[hh]
                for o in range(m):
                    w = scores[hh, j * bs + o]
                    for d in range(dim):
                        a[d] += w * vb[o, d]
        for hh in range(nh):
            for d in range(dim):
                out[i, h0 + hh, d] = acc[hh, d]

import mini_engine_backends.pytorch.paged_attention as pa
H, D, BS, L = 12, 64, 16, 12
rng = np.random.default_rng(0)
rows = int(sys.argv[1]); ctx = int(sys.argv[2])
per = (ctx + 1 + BS - 1) // BS
nb = rows * per + 1
kp = [rng.standard_normal((nb, H, BS, D), dtype=np.float32) for _ in range(L)]
vp = [rng.standard_normal((nb, H, BS, D), dtype=np.float32) for _ in range(L)]
tables = rng.permutation(rows * per).astype(np.int32).reshape(rows, per)
qs = np.arange(rows + 1, dtype=np.int32); cl = np.full(rows, ctx, np.int32)
q = rng.standard_normal((rows, H, D), dtype=np.float32)
rws, _ = pa.split_tasks(qs, cl, H, 1)
ref = np.empty_like(q); pa.attention_tasks(q, kp[0], vp[0], tables, rws, qs, cl, np.float32(0.125), ref, 0, rows*H)
o = np.empty_like(q); kern_heads(q, kp[0], vp[0], tables, rws, qs, cl, np.float32(0.125), o, 0, rows, 0, H)
print("maxdiff", float(np.abs(o - ref).max()))
mb = rows * L * 2 * H * (ctx + 1) * D * 4 / 1e6
from concurrent.futures import ThreadPoolExecutor
ex = ThreadPoolExecutor(1)
def cur():
    o = np.empty_like(q)
    for l in range(L): pa.attention_tasks(q, kp[l], vp[l], tables, rws, qs, cl, np.float32(0.125), o, 0, rows*H)
def heads1():
    o = np.empty_like(q)
    for l in range(L): kern_heads(q, kp[l], vp[l], tables, rws, qs, cl, np.float32(0.125), o, 0, rows, 0, H)
def heads2():
    o = np.empty_like(q)
    for l in range(L):
        f = ex.submit(kern_heads, q, kp[l], vp[l], tables, rws, qs, cl, np.float32(0.125), o, 0, rows, H//2, H)
        kern_heads(q, kp[l], vp[l], tables, rws, qs, cl, np.float32(0.125), o, 0, rows, 0, H//2)
        f.result()
fns = {"current 1 thread": cur, "all-heads 1 thread": heads1, "all-heads 2 threads (6 heads each)": heads2}
res = {k: [] for k in fns}
for f in fns.values(): f()
for _ in range(7):
    for k, f in fns.items():
        t = time.perf_counter(); f(); res[k].append(time.perf_counter() - t)
for k, v in res.items():
    m = statistics.median(v) * 1e3
    print(f"rows {rows} ctx {ctx} {k}: {m:.2f} ms ({mb/m:.1f} GB/s)")
