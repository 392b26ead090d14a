#!/usr/bin/env python
"""Which fp32 matrix kernel streams GPT-2's linear weights fastest on this CPU, per row count?

All linear weights of one GPT-2 decode step (12 x [c_attn, attn c_proj, c_fc, mlp c_proj] + the
tied lm_head, ~498 MB for GPT-2 small) applied to M rows, the median of --repeats passes,
each kernel in turn in one process:

    python benchmarks/linear_kernels_bench.py --rows 1,2,4,16

Kernels: plain F.linear (MKL), addmm over a K-major copy (MKL), oneDNN with prepacked weights,
MKL packed GEMM (what torch.compile's freezing emits), numpy/OpenBLAS over the [N, K] weight, over
a K-major copy, and per shape (what the torch backend uses for single-row steps; oneDNN otherwise).
"""
from __future__ import annotations

import argparse
import time

import mini_engine  # noqa: F401  (sets OpenBLAS's thread timeout before numpy loads)
import numpy as np
import torch


def kernels(weights, biases, rows: int) -> dict:
    k_major = [w.t().contiguous() for w in weights]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in weights]
    np_w = [w.numpy() for w in weights]
    np_kt = [w.numpy() for w in k_major]
    np_b = [b.numpy() for b in biases]
    zipped = list(zip(weights, biases, k_major, onednn, mkl, np_w, np_kt, np_b))
    return {
        "F.linear (MKL)": [lambda x, w=w, b=b: torch.nn.functional.linear(x, w, b) for w, b, *_ in zipped],
        "addmm, K-major (MKL)": [lambda x, b=b, kt=kt: torch.addmm(b, x, kt) for _, b, kt, *_ in zipped],
        "oneDNN prepacked": [lambda x, p=p, b=b: torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")
                             for _, b, _, p, *_ in zipped],
        "MKL packed": [lambda x, q=q, w=w, b=b: torch.ops.mkl._mkl_linear(x, q, w, b, rows)
                       for w, b, _, _, q, *_ in zipped],
        "numpy, [N, K]": [lambda x, w=w, b=b: x.numpy() @ w.T + b for *_, w, _, b in zipped],
        "numpy, K-major": [lambda x, w=w, b=b: x.numpy() @ w + b for *_, w, b in zipped],
        # the torch backend's single-row layout: [N, K] where N < K, else K-major
        "numpy, per shape": [(lambda x, w=w, b=b: x.numpy() @ w.T + b) if w.shape[0] < w.shape[1]
                             else (lambda x, kt=kt, b=b: x.numpy() @ kt + b)
                             for *_, w, kt, b in zipped],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,16", help="comma list of row counts (batch x new tokens)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    args = ap.parse_args()

    torch.manual_seed(0)
    d = args.n_embd
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * args.n_layer + [(d, args.vocab)]
    weights = [torch.randn(n, k) for k, n in shapes]
    biases = [torch.randn(n) for _, n in shapes]
    total = sum(w.numel() * 4 for w in weights)
    print(f"{total / 1e6:.0f} MB of fp32 weights, {torch.get_num_threads()} torch threads, "
          f"median of {args.repeats} passes")
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            inputs = {k: torch.randn(rows, k) for k in {k for k, _ in shapes}}
            print(f"rows = {rows}")
            for name, fns in kernels(weights, biases, rows).items():
                times = []
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    for (k, _), fn in zip(shapes, fns):
                        fn(inputs[k])
                    times.append(time.perf_counter() - t)
                med = float(np.median(times))
                print(f"  {name:22s} {med * 1e3:7.1f} ms  {total / med / 1e9:5.1f} GB/s")


if __name__ == "__main__":
    main()
