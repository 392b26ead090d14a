#!/usr/bin/env python
"""Where an ONNX Runtime decode step spends its time, per operator type, from ORT's own profiler.

Loads the onnxruntime backend for --model / --dtype (exporting on first use, as the backend does),
then runs the graph it serves for continuous batching (gqa-v1) in a session of its own, with the
backend's session options (threads, optimization level, thread spinning as the backend resolved
it here) plus profiling: --steps decode steps of --batch rows after --past cached tokens, the
first --warmup of them left out. Prints the mean model_run time, and per operator type the kernel
time a step spends in it and its share of model_run, with the bytes of weights a step reads and
the rate the weight-reading ops read them at.

    python benchmarks/ort_op_profile.py --model random:gpt2 --dtype int8 --batch 1 --past 32

Profiling adds overhead of its own (timestamps per node): compare operator shares, not the total,
with other benchmarks.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import cpu_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--dtype", default="int8")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--past", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)

    import mini_engine  # noqa: F401 - before numpy (OpenBLAS settings)
    import numpy as np
    import onnxruntime as ort
    from mini_engine.model.source import resolve_model
    from mini_engine.registry import get_backend
    from mini_engine.runner import RunnerConfig
    from mini_engine_export.onnx_gqa import GqaKV, run_step

    source = resolve_model(args.model)
    runner = get_backend("onnxruntime")(RunnerConfig(model=source, device="cpu", dtype=args.dtype))
    runner.load()
    graph, weight_bytes, spinning = str(runner.onnx_file), runner.weight_bytes, runner.spinning
    from mini_engine_backends.onnxruntime.session import session_options

    so = session_options(runner.options, spinning)
    runner.close()

    cfg = source.config
    with tempfile.TemporaryDirectory() as tmp:
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
        kv = GqaKV.allocate(cfg, args.batch, cfg.n_positions)
        for buf in kv.keys + kv.values:  # mapped, as a cache in use is (untouched pages read as the zero page)
            buf.fill(0.01)
        for s in range(args.warmup + args.steps):
            pos = args.past + s
            feeds = {"input_ids": np.full((args.batch, 1), 11, np.int64),
                     "position_ids": np.full((args.batch, 1), pos, np.int64),
                     "seqlens_k": np.full(args.batch, pos, np.int32),
                     "total_sequence_length": np.array(cfg.n_positions, np.int32),
                     "query_lens": np.ones(args.batch, np.int32)}
            run_step(sess, kv, feeds, 0)
        events = json.loads(Path(sess.end_profiling()).read_text())

    runs_ev = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"),
                     key=lambda e: e["ts"])[args.warmup:]
    cutoff = runs_ev[0]["ts"]
    per_op, calls = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= cutoff:
            op = e["args"].get("op_name")
            per_op[op] += e["dur"]
            calls[op] += 1
    run_us, runs = sum(e["dur"] for e in runs_ev), len(runs_ev)
    step_us = run_us / runs
    print(f"{args.model} {args.dtype}, batch {args.batch}, {args.past}+ cached tokens, {args.steps} steps after "
          f"{args.warmup} warm-up; thread spinning {'on' if spinning else 'off'}; CPU: {cpu_model()}; graph {graph}")
    print(f"model_run: {step_us / 1e3:.2f} ms a step (profiling on); weights read a step: {weight_bytes / 1e6:.1f} MB")
    print("| op | ms a step | share | calls a step |")
    print("|---|---:|---:|---:|")
    for op, us in per_op.most_common():
        print(f"| {op} | {us / runs / 1e3:.3f} | {us / run_us:.0%} | {calls[op] / runs:.0f} |")
    matmul_ops = {"DynamicQuantizeMatMul", "MatMulInteger", "MatMulNBits", "MatMul", "Gemm", "FusedMatMul"}
    matmul_us = sum(us for op, us in per_op.items() if op in matmul_ops) / runs
    if matmul_us:
        print(f"weight-reading ops: {matmul_us / 1e3:.2f} ms a step, {weight_bytes / matmul_us / 1e3:.1f} GB/s")
    return 0


if __name__ == "__main__":
    from mini_engine.errors import MiniEngineError

    try:
        sys.exit(main())
    except MiniEngineError as e:  # a bad model, dtype or export: one line, not a traceback
        sys.exit(f"error: {e}")
