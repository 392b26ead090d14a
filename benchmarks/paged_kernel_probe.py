#!/usr/bin/env python
"""Probe: how fast the torch backend's paged-attention kernel reads its KV blocks, against the
kernels it replaced and against a plain streaming read of the same bytes.

Kernels, on the 12 layers of GPT-2 small, blocks in shuffled order as in a pool in use:
- before: one task per (token, head): it reads one head's 4 KB slice of each block of the row
  (the next slice it reads is 48 KB away), all K first, then all V after a softmax pass; 16-token
  blocks, head-major pool [num_blocks, n_head, block_size, head_dim];
- head-major: a task walks a row's blocks once for all its heads, K and V of a block back to back,
  online softmax, the pool on transparent huge pages; 16-token blocks, head-major pool (shipped
  until 2026-12-03);
- shipped (backends/pytorch/paged_attention.py): the same walk over a token-major pool
  [num_blocks, block_size, n_head, head_dim], so the tokens of a block lie front to back whatever
  the context; at 16-token blocks and at --block-size (default 128, the backend's choice).
Each on 1 and 2 threads (2: tokens in halves; head-major also splits a lone token's heads in
halves, as it shipped; the token-major kernel never splits a token, so at --rows 1 it runs on one
thread only), and
torch.sum over one array of the same bytes: the read rate a well-vectorized loop reaches here.
The kernels run outside any torch op, as in a step only after torch's OpenMP workers stop
spinning (mini_engine sets GOMP_SPINCOUNT; see mini_engine/__init__.py).

    python benchmarks/paged_kernel_probe.py --rows 16 --context 1000 [--block-size 128] [--rounds 9] [--small-pages]
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


@njit(nogil=True, fastmath=True)
def head_major(q, kpool, vpool, block_tables, rows, query_start, context_lens, scale, out, groups, lo, hi):
    """The kernel shipped until 2026-12-03: the same walk and online softmax as today's, over a
    head-major pool [num_blocks, n_head, block_size, head_dim]: per block, head by head, one head's
    contiguous slice of K, then of V."""
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--context", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--block-size", type=int, default=128, help="tokens per block of the shipped kernel's second pool")
    p.add_argument("--small-pages", action="store_true",
                   help="the huge-page pools as plain numpy arrays (4 KB pages unless THP is 'always')")
    a = p.parse_args()
    H, D, L = 12, 64, 12
    rng = np.random.default_rng(0)
    rows, ctx = a.rows, a.context
    q = rng.standard_normal((rows, H, D), dtype=np.float32)
    qs = np.arange(rows + 1, dtype=np.int32)
    cl = np.full(rows, ctx, np.int32)
    sc = np.float32(1 / math.sqrt(D))
    rws = np.arange(rows)
    ex = ThreadPoolExecutor(1)

    def pools(bs, token_major, huge):
        """Per-layer K and V pools and shuffled block tables: every row holds the same tokens in every
        layout and block size (seeded per layer), so all kernels compute the same output."""
        per = (ctx + 1 + bs - 1) // bs
        nb = rows * per + 1
        if huge:
            kt, vt = pa.allocate_pool(L, nb, H, bs, D)  # token-major; a head-major view is a reshape
        else:
            kt = [np.zeros((nb, bs, H, D), np.float32) for _ in range(L)]
            vt = [np.zeros((nb, bs, H, D), np.float32) for _ in range(L)]
        if not token_major:
            kt, vt = [k.reshape(nb, H, bs, D) for k in kt], [v.reshape(nb, H, bs, D) for v in vt]
        tables = rng.permutation(rows * per).astype(np.int32).reshape(rows, per)
        for layer in range(L):
            layer_rng = np.random.default_rng(layer)
            for pool in (kt[layer], vt[layer]):
                tokens = layer_rng.standard_normal((rows, ctx + 1, H, D), dtype=np.float32)
                for r in range(rows):
                    for j in range(per):
                        t = tokens[r, j * bs:(j + 1) * bs]
                        if token_major:
                            pool[tables[r, j], :len(t)] = t
                        else:
                            pool[tables[r, j], :, :len(t)] = t.transpose(1, 0, 2)
        return kt, vt, tables

    def kernel(fn, pool, unit_groups: bool):
        """fn over all layers on 1 or 2 threads. unit_groups: fn takes (..., groups, lo, hi) work units
        of a token's heads (head-major: at 2 threads a lone token's heads split in halves); else
        (..., lo, hi) over whole tokens."""
        kt, vt, tables = pool

        def run(threads):
            o = np.empty_like(q)
            groups = 2 if unit_groups and threads == 2 and rows < 4 else 1
            units = rows * groups
            for layer in range(L):
                args = (q, kt[layer], vt[layer], tables, rws, qs, cl, sc, o) + ((groups,) if unit_groups else ())
                if threads == 1:
                    fn(*args, 0, units)
                else:
                    f = ex.submit(fn, *args, units // 2, units)
                    fn(*args, 0, units // 2)
                    f.result()
            return o
        return run

    huge = not a.small_pages
    before_pool = pools(16, False, False)  # plain numpy arrays, as its pool shipped
    # before's tasks are (token, head): a token's range of units scaled by n_head.
    kernels = {"before": kernel(lambda *x: before(*x[:9], x[9] * H, x[10] * H), before_pool, False),
               "head-major": kernel(head_major, pools(16, False, huge), True),
               "shipped @16": kernel(pa.attention_units, pools(16, True, huge), False)}
    if a.block_size != 16:
        kernels[f"shipped @{a.block_size}"] = kernel(pa.attention_units, pools(a.block_size, True, huge), False)
    ref = kernels["before"](1)
    for name, fn in kernels.items():
        print(f"max |before - {name}|:", float(np.abs(fn(1) - ref).max()))

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

    # A lone token is never split by the token-major kernel: its second thread would only idle.
    res = rounds({f"{name} {t} thread{'s' if t > 1 else ''}": (lambda fn=fn, t=t: fn(t))
                  for name, fn in kernels.items() for t in (1, 2)
                  if not (t == 2 and rows < 2 and name.startswith("shipped"))})
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
    pages = "plain numpy arrays" if a.small_pages else "MADV_HUGEPAGE (before: plain numpy arrays)"
    pages += f"; THP setting: {thp}"
    print(f"rows {rows} x context {ctx}: K+V {mb:.0f} MB per step, pools on {pages}, "
          f"median of {a.rounds} rounds (kernels alternating)")
    for k, v in res.items():
        m = statistics.median(v) * 1e3
        print(f"  {k:24s} {m:8.2f} ms  {mb / m:5.1f} GB/s")


if __name__ == "__main__":
    main()
