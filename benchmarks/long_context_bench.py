#!/usr/bin/env python
"""Decode step time against context length: is the KV cache read, or re-copied, every step?

For each target, batch size and context length, one decode step (one new token per row) is
timed at the runner, the median of --steps steps after a warm-up, on two paths:

- paged: the continuous-batching contract (`Runner.execute_paged`): rows read their own
  blocks of the KV pool in place (block tables shuffled, as a pool in use is).
- static: the static contract (`Runner.execute` with past_len = context): the torch backend's
  contiguous per-slot buffers; ONNX Runtime's concat export (present = past ++ new, a copy of
  the whole cache each step).

The cache's contents do not change a step's cost, so no prefill runs: the pool or buffers are
filled with a constant first (ORT static: constant past tensors bound as the previous step's
presents). Filled, not just allocated: pages never written all map the kernel's one zero page,
which reads from cache and would flatter every path.

    python benchmarks/long_context_bench.py --model random:gpt2 --targets torch:cpu,onnxruntime:cpu \
        --batch-sizes 1,16 --contexts 64,256,512,1000 --out result/cpu/long_context

--block-sizes: tokens per block of the paged pool, 'auto' (default) being the backend's own choice
(Runner.preferred_block_size: 128 for the torch kernel); several sizes alternate within each round.

Reported: step ms, ratio to the step at the shortest context, KV bytes per step, and the bytes
(weights + KV) moved per second, next to the machine's numpy copy bandwidth.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import command_line, copy_bandwidth_gbps, cpu_model, run_targets, write_report  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--targets", default="torch:cpu,onnxruntime:cpu")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--contexts", default="64,256,512,1000")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3, help="rounds over all contexts; figures are medians over rounds")
    p.add_argument("--paths", default="paged,static")
    p.add_argument("--block-sizes", default="auto",
                   help="tokens per KV block of the paged path: 'auto' (what the backend asks the engine for) or "
                        "numbers; several (e.g. 16,128) are timed in the same rounds")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> list[dict]:
    import mini_engine  # noqa: F401 - first: it sets OpenBLAS's thread timeout before numpy loads it
    import numpy as np
    from mini_engine.model.source import resolve_model
    from mini_engine.registry import get_backend
    from mini_engine.runner import RunnerConfig

    backend, _, device = args.worker.partition(":")
    source = resolve_model(args.model)
    runner = get_backend(backend)(RunnerConfig(model=source, device=device or "cpu"))
    runner.load()
    cfg = source.config
    rows = []
    batches = [int(b) for b in args.batch_sizes.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    paths = args.paths.split(",")
    kv_per_token = runner.kv_bytes_per_token
    rng = np.random.default_rng(0)

    for path in paths:
        if path == "paged" and runner.paged_unsupported_reason():
            rows.append({"target": args.worker, "path": path, "status": "skipped",
                         "reason": runner.paged_unsupported_reason()})
            continue
        # A block size per variant of the paged path; the static path has none.
        variants = [runner.preferred_block_size if x == "auto" else int(x) for x in args.block_sizes.split(",")] \
            if path == "paged" else [0]
        for b in batches:
            # Rounds visit every context (and block size) in turn, so a slow minute of a shared
            # machine lands on all of a round's cells rather than on one cell's figure.
            times = {(bs, ctx): [] for bs in variants for ctx in contexts}
            for _ in range(args.rounds):
                for bs in variants:
                    per_row = -(-(max(contexts) + 1) // bs) if bs else 0
                    if path == "paged":
                        runner.allocate_kv_pool(b * per_row, bs, b)
                        _fill(runner)
                    for ctx in contexts:
                        times[bs, ctx].append(one_step_ms(runner, path, backend, b, ctx, bs, per_row, cfg, rng, args.steps))
                    if path == "paged":
                        runner.free_kv_pool()
            for bs in variants:
                base = times[bs, min(contexts)]
                for ctx in contexts:
                    got = times[bs, ctx]
                    ms = statistics.median(got)
                    kv = b * ctx * kv_per_token
                    rows.append({"target": args.worker, "path": path, "status": "ok", "batch_size": b,
                                 "context": ctx, "block_size": bs or None,
                                 "step_ms": round(ms, 2), "rounds_ms": [round(t, 2) for t in got],
                                 "vs_first": round(statistics.median(t / t0 for t, t0 in zip(got, base)), 3),
                                 "kv_mb": round(kv / 1e6, 1), "weights_mb": round(runner.weight_bytes / 1e6, 1),
                                 "gbps": round((runner.weight_bytes + kv) / ms / 1e6, 1)})
    runner.close()
    return rows


def timed(fn, steps: int) -> float:
    """Median ms of `steps` calls of fn, after two warm-up calls."""
    fn()
    fn()
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out) * 1e3


def one_step_ms(runner, path, backend, b, ctx, bs, per_row, cfg, rng, steps) -> float:
    """Decode step ms of `b` rows at context `ctx`: paged (block tables of `per_row` blocks of `bs` tokens,
    shuffled) or static."""
    import numpy as np
    from mini_engine.core.plan import PagedStep
    from mini_engine.runner import StepInput

    ids = rng.integers(0, 50000, b).astype(np.int64)
    if path == "paged":
        tables = rng.permutation(b * per_row).reshape(b, per_row).astype(np.int32)
        pos = np.full(b, ctx, np.int64)
        slots = tables[np.arange(b), ctx // bs].astype(np.int64) * bs + ctx % bs
        step = PagedStep(ids, pos, np.arange(b + 1, dtype=np.int64), np.full(b, ctx, np.int64),
                         tables, slots, np.arange(b, dtype=np.int64), bs, [f"s{i}" for i in range(b)])
        if runner.kv_layout == "slots":
            # A row per sequence: pretend each row already holds `ctx` tokens and keep the
            # step from advancing them, so every timed step sees the same context.
            for i in range(b):
                runner.slot_of[f"s{i}"] = i
            runner.free_slots = [s for s in runner.free_slots if s >= b]

            def run_slots():
                runner.slot_len[:b] = ctx
                return runner.execute_paged(step)
            return timed(run_slots, steps)
        return timed(lambda: runner.execute_paged(step), steps)
    runner.allocate_kv(b, ctx + 1)
    _fill(runner)
    step = StepInput(ids[:, None], np.full((b, 1), ctx, np.int64), np.ones((b, ctx + 1), np.int64),
                     list(range(b)), ctx)
    try:
        if backend == "onnxruntime":
            pasts = _ort_pasts(runner, b, ctx, cfg)
            return timed(lambda: _ort_decode(runner, step, pasts, b, ctx), steps)
        return timed(lambda: runner.execute(step), steps)
    finally:
        runner.free_kv()


def _fill(runner) -> None:
    """Write every KV buffer the runner holds (see the module docstring)."""
    for name in ("pool_keys", "pool_values", "keys", "values"):
        for buf in getattr(runner, name, None) or []:
            buf.fill(0.01) if hasattr(buf, "fill") else buf.fill_(0.01)
    kv = getattr(runner, "kv", None)
    if kv is not None:
        for buf in kv.keys + kv.values:
            buf.fill(0.01)


def _ort_pasts(runner, b, ctx, cfg) -> list:
    """Constant past tensors of `ctx` positions for the concat export, made once per (batch, context)
    so the timed step is ORT's alone (it never writes to its inputs)."""
    from onnxruntime import OrtValue
    import numpy as np

    past = np.full((b, cfg.n_head, ctx, cfg.head_dim), 0.01, np.float32)
    return [OrtValue.ortvalue_from_numpy(past.copy()) for _ in runner.past_names]


def _ort_decode(runner, step, pasts: list, b, ctx):
    """One concat-export decode step from a cache of `ctx` positions (`pasts` bound as the last presents)."""
    runner.past = list(pasts)
    runner.layout, runner.cached_len = list(range(b)), ctx
    return runner.execute(step)


def markdown(report: dict) -> str:
    lines = [f"Decode step time vs context, {report['model']} float32, CPU: {report['cpu']} "
             f"({report['cores']} cores), numpy copy bandwidth {report['copy_gbps']} GB/s; step ms: median over "
             f"{report.get('rounds', 1)} rounds (each visiting every context in turn) of the median of {report['steps']} "
             f"steps; vs shortest context: median of the per-round ratios.", "", f"Command: `python {report['command']}`", "",
             "| target | path | block | batch | context | step ms | vs shortest context | KV MB/step | (weights+KV) GB/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['target']} | {r['path']} | | | | skipped: {r['reason']} | | | |")
            continue
        lines.append(f"| {r['target']} | {r['path']} | {r.get('block_size') or '-'} | {r['batch_size']} | {r['context']} | {r['step_ms']:.1f} | "
                     f"{r['vs_first']:.2f}x | {r['kv_mb']:.0f} | {r['gbps']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        print("error: --rounds and --steps must be >= 1", file=sys.stderr)
        return 2
    if any(x != "auto" and not (x.isdigit() and int(x) > 0) for x in args.block_sizes.split(",")):
        print(f"error: --block-sizes takes 'auto' or positive integers, comma-separated; got '{args.block_sizes}'",
              file=sys.stderr)
        return 2
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    rows = []
    for target, got, reason in run_targets(__file__, args):
        rows += got if reason is None else [{"target": target, "path": "-", "status": "skipped", "reason": reason}]
    report = {"command": command_line(), "model": args.model, "cpu": cpu_model(), "cores": os.cpu_count(),
              "copy_gbps": copy_bandwidth_gbps(), "steps": args.steps, "rounds": args.rounds, "rows": rows}
    write_report(args.out, report, markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
