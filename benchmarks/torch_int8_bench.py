#!/usr/bin/env python
"""The torch backend's quantized precisions on CPU: which int8 kernel, and how much faster end to end.

Two measurements, each in its own mode:

    python benchmarks/torch_int8_bench.py kernels --rows 1,16
    python benchmarks/torch_int8_bench.py generate --rounds 3 --batch-sizes 1,16 --dtypes float32,int8

`kernels`: every linear weight of one GPT-2 small decode step (12 x [c_attn, attn c_proj, c_fc,
mlp c_proj], then the tied lm_head, which is listed apart) applied to M rows through each candidate
kernel, the median of --repeats passes, one process. Weights are quantized per output channel
(symmetric, absmax / 127) for every int8 kernel.

`generate`: greedy generation through the engine (benchmarks/generate_bench.py's worker: one
subprocess per target and batch size, 32-token prompts, 64 new tokens, median of --runs runs after a
warm-up), the dtypes taking turns within each of --rounds rounds; every ratio to float32 is taken
within a round, and the table gives the medians over rounds.

Record the CPU with every figure: the script prints lscpu's model name and whether avx512_vnni is
present. To see how a kernel fares without AVX-512 on an AVX-512 machine, run it with
ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 (oneDNN's and ATen's own ISA caps; fbgemm has no
such cap and keeps its AVX-512 kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_line() -> str:
    model, flags = "?", ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("Flags:"):
                flags = line
    except OSError:
        pass
    caps = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni") if f" {f}" in flags]
    env = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    return f"CPU: {model} ({os.cpu_count()} cores; {', '.join(caps) or 'no AVX2'})" + (f"; env {env}" if env else "")


# ----- kernels --------------------------------------------------------------------------------
def kernel_candidates(weights, biases, rows: int) -> dict:
    import torch

    from mini_engine_backends.pytorch.int8_linear import Int4Linear, Int8Linear, quantize_weight_int8

    cands: dict = {}
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    cands["float32 oneDNN prepacked"] = [
        lambda x, p=p, b=b: torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "") for p, b in zip(onednn, biases)]
    if rows == 1:
        layouts = [(w.numpy(), True) if w.shape[0] < w.shape[1] else (w.t().contiguous().numpy(), False) for w in weights]
        cands["float32 numpy GEMV (OpenBLAS)"] = [
            (lambda x, w=w, b=b.numpy(): w @ x.numpy()[0] + b) if n_major else
            (lambda x, w=w, b=b.numpy(): x.numpy()[0] @ w + b) for (w, n_major), b in zip(layouts, biases)]
    ours = [Int8Linear(w, b) for w, b in zip(weights, biases)]
    cands[f"int8 W8A8 per-row, oneDNN u8s8 (ours, |q|<={int(ours[0].levels)})"] = [m.forward for m in ours]
    if rows == 1:  # the batch-1 decode path: the same math in a numba GEMV, split over the torch threads
        from mini_engine_backends.pytorch.int8_linear import Int8Gemv

        gemvs = [Int8Gemv(m, torch.get_num_threads()) for m in ours]
        cands["int8 W8A8 per-row, numba GEMV (ours, batch-1 path)"] = [lambda x, g=g: g(x.numpy()[0]) for g in gemvs]
    q = [quantize_weight_int8(w) for w in weights]
    for engine in ("fbgemm", "onednn"):
        if engine not in torch.backends.quantized.supported_engines:
            continue
        torch.backends.quantized.engine = engine
        packs = []
        for (qw, s), b in zip(q, biases):
            per_ch = torch._make_per_channel_quantized_tensor(qw, s.double(), torch.zeros(len(s), dtype=torch.long), 0)
            packs.append(torch.ops.quantized.linear_prepack(per_ch, b))
        cands[f"int8 W8A8 per-tensor, quantized::linear_dynamic ({engine})"] = [
            lambda x, p=p: torch.ops.quantized.linear_dynamic(x, p) for p in packs]
    cands["int8 weight-only, _weight_int8pack_mm (bf16 x)"] = [
        lambda x, qw=qw, s=s.bfloat16(), b=b: torch._weight_int8pack_mm(x.bfloat16(), qw, s).float().add_(b)
        for (qw, s), b in zip(q, biases)]
    if rows == 1:  # its float32 path is a reference loop: ~2 s per pass at 16 rows
        cands["int8 weight-only, _weight_int8pack_mm (fp32 x)"] = [
            lambda x, qw=qw, s=s, b=b: torch._weight_int8pack_mm(x, qw, s).add_(b) for (qw, s), b in zip(q, biases)]
    kt = [qw.t().contiguous() for qw, _ in q]

    def int_mm(x, w, s, b):
        xs = x.abs().amax(1, keepdim=True).clamp_min(1e-30) / 127
        return torch.addcmul(b, torch._int_mm(torch.round(x / xs).to(torch.int8), w).float(), xs * s)

    cands["int8 W8A8 per-row, torch._int_mm"] = [
        lambda x, w=w, s=s, b=b: int_mm(x, w, s, b) for w, (_, s), b in zip(kt, q, biases)]
    for block in (32, 128):
        if weights[0].shape[0] % 16:  # the int4 packing needs N % 16 == 0: not the 50257-row lm_head
            continue
        mods = [Int4Linear(w, b, block) for w, b in zip(weights, biases)]
        if rows == 1:  # the float32 path is a reference loop: ~1.4 s per pass at 16 rows
            cands[f"int4 weight-only block {block}, _weight_int4pack_mm_for_cpu (fp32 x)"] = [
                lambda x, m=m, sz=m.scale_zero.float(): torch._weight_int4pack_mm_for_cpu(
                    x, m.packed, m.block_size, sz).add_(m.bias) for m in mods]
        cands[f"int4 weight-only block {block}, _weight_int4pack_mm_for_cpu (bf16 x, ours)"] = [m.forward for m in mods]
    return cands


def run_kernels(args) -> None:
    import numpy as np
    import torch

    torch.manual_seed(0)
    d, v = 768, 50257
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * 12  # (N, K)
    weights = [torch.randn(n, k) * 0.02 for n, k in shapes]
    biases = [torch.randn(n) * 0.01 for n, _ in shapes]
    head = [torch.randn(v, d) * 0.02]
    lines = [cpu_line(), f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} passes",
             f"blocks: 48 linears, {sum(w.numel() for w in weights) / 1e6:.1f} M weights; lm_head {v} x {d}",
             "", "| rows | kernel | 48 block linears ms | lm_head ms |", "|---:|---|---:|---:|"]
    print("\n".join(lines), flush=True)
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            xs = {k: torch.randn(rows, k) for k in (d, 4 * d)}
            blocks = kernel_candidates(weights, biases, rows)
            heads = kernel_candidates(head, [torch.zeros(v)], rows)
            for name, fns in blocks.items():
                cols = []
                for fs, shp in ((fns, shapes), (heads.get(name), [(v, d)])):
                    if fs is None:
                        cols.append("-")
                        continue
                    times = []
                    for _ in range(args.repeats + 1):
                        t = time.perf_counter()
                        for (_, k), fn in zip(shp, fs):
                            fn(xs[k])
                        times.append(time.perf_counter() - t)
                    cols.append(f"{float(np.median(times[1:])) * 1e3:.2f}")
                line = f"| {rows} | {name} | {cols[0]} | {cols[1]} |"
                lines.append(line)
                print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


# ----- end to end ------------------------------------------------------------------------------
def run_generate(args) -> None:
    dtypes = args.dtypes.split(",")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    rows = []
    print(cpu_line(), file=sys.stderr)
    for rnd in range(args.rounds):
        for batch in batches:
            for dtype in dtypes:
                cmd = [sys.executable, str(HERE / "generate_bench.py"), "--worker", args.target, "--batch", str(batch),
                       "--model", args.model, "--prompt-len", str(args.prompt_len), "--new-tokens",
                       str(args.new_tokens), "--runs", str(args.runs), "--dtype", dtype]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{dtype} batch {batch}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                tps = batch * args.new_tokens / statistics.median(r["times_s"])
                rows.append({"round": rnd, "dtype": dtype, "batch_size": batch, "tokens_per_s": tps,
                             "decode_step_ms": r["decode_step_ms"], "weight_bytes": r["weight_bytes"],
                             "path": r["path"], "quantization": r["runner"].get("quantization")})
                print(f"round {rnd} batch {batch:3d} {dtype:8s}: {tps:7.1f} tok/s, decode step "
                      f"{r['decode_step_ms']:.2f} ms, {r['weight_bytes'] / 1e6:.0f} MB/step ({r['path']})",
                      file=sys.stderr, flush=True)
    lines = [cpu_line(), f"command: python benchmarks/torch_int8_bench.py {' '.join(sys.argv[1:])}",
             f"model {args.model}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, median of "
             f"{args.runs} runs per round, {args.rounds} rounds (dtypes alternate within a round)", "",
             "| batch | dtype | tok/s (median of rounds) | per round | x float32 (per-round ratio, median) | "
             "decode step ms | MB/step | GB/s at decode |", "|---:|---|---:|---|---:|---:|---:|---:|"]
    for batch in batches:
        for dtype in dtypes:
            mine = [r for r in rows if r["batch_size"] == batch and r["dtype"] == dtype]
            ratios = []
            for r in mine:
                ref = [f for f in rows if f["round"] == r["round"] and f["batch_size"] == batch and f["dtype"] == "float32"]
                if ref:
                    ratios.append(r["tokens_per_s"] / ref[0]["tokens_per_s"])
            step = statistics.median(r["decode_step_ms"] for r in mine)
            mb = mine[0]["weight_bytes"] / 1e6
            lines.append(f"| {batch} | {dtype} | {statistics.median(r['tokens_per_s'] for r in mine):.1f} | "
                         f"{', '.join(format(r['tokens_per_s'], '.1f') for r in mine)} | "
                         f"{statistics.median(ratios):.2f} | {step:.2f} | {mb:.0f} | {mb / step:.1f} |")
    print("\n".join(lines))
    if args.out:
        Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps({"cpu": cpu_line(), "rows": rows}, indent=2) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--rows", default="1,16")
    k.add_argument("--repeats", type=int, default=7)
    k.add_argument("--out", default=None, help="also write the table to this file")
    g = sub.add_parser("generate")
    g.add_argument("--model", default="random:gpt2")
    g.add_argument("--target", default="torch:cpu")
    g.add_argument("--dtypes", default="float32,int8")
    g.add_argument("--batch-sizes", default="1,16")
    g.add_argument("--prompt-len", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--runs", type=int, default=3)
    g.add_argument("--rounds", type=int, default=3)
    g.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = ap.parse_args(argv)
    run_kernels(args) if args.mode == "kernels" else run_generate(args)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
