#!/usr/bin/env python
"""The seed studies' grid: prompt length x batch size x max tokens -> optimized vs naive tokens/s.

Optimized: the engine's generation path (continuous batching where the backend has it), all
BatchSize requests submitted at once. Naive: one request at a time, no KV cache (every new token
re-runs the whole sequence: Engine.generate_uncached), on min(BatchSize, --naive-requests)
requests, since its tokens/s does not depend on how many wait. Greedy, EOS ignored, seeded prompts;
one target per subprocess.

    python benchmarks/grid_bench.py --model random:gpt2 --targets torch:cpu,onnxruntime:cpu \
        --prompt-lens 16,128 --batch-sizes 1,4,16 --max-tokens 32,128 --out result/cpu/grid
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import command_line, copy_bandwidth_gbps, cpu_model, run_targets, write_report  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--targets", default="torch:cpu,onnxruntime:cpu")
    p.add_argument("--prompt-lens", default="16,128")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--max-tokens", default="32,128")
    p.add_argument("--naive-requests", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def ints(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{name} must be a comma list of integers, got '{text}'") from None


def worker(args) -> list[dict]:
    import mini_engine  # noqa: F401 - first: it sets OpenBLAS's thread timeout before numpy loads OpenBLAS
    import numpy as np

    from mini_engine import Engine
    from mini_engine.sampling import SamplingParams
    from mini_engine.sequence import Sequence

    backend, _, device = args.worker.partition(":")
    batches = ints(args.batch_sizes, "--batch-sizes")
    engine = Engine.from_config(None, model=args.model, backend=backend, device=device or "cpu",
                                **{"scheduler.max_num_seqs": max(batches),
                                   "batching.max_batch_size": max(batches)})
    rng = np.random.default_rng(0)
    rows = []

    def optimized(prompts, params) -> float:
        t = time.perf_counter()
        if engine.continuous:
            left = {engine.add_request(None, p, params).request_id for p in prompts}
            while left:
                for o in engine.step():
                    if o.finished:
                        left.discard(o.request_id)
        else:
            engine.generate_batch([Sequence(i, "", p) for i, p in enumerate(prompts)], params)
        return time.perf_counter() - t

    warm = [rng.integers(0, 50000, 8).tolist() for _ in range(2)]
    optimized(warm, SamplingParams(max_new_tokens=4, ignore_eos=True))
    engine.generate_uncached(Sequence(0, "", warm[0]), SamplingParams(max_new_tokens=2, ignore_eos=True))
    for plen in ints(args.prompt_lens, "--prompt-lens"):
        for tokens in ints(args.max_tokens, "--max-tokens"):
            params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
            naive_n = args.naive_requests
            prompts = [rng.integers(0, 50000, plen).tolist() for _ in range(max(batches))]
            t = time.perf_counter()
            for i in range(naive_n):
                engine.generate_uncached(Sequence(i, "", prompts[i]), params)
            naive = naive_n * tokens / (time.perf_counter() - t)
            for b in batches:
                if engine.continuous:
                    engine.scheduler.block_manager.reset_prefix_cache()
                opt = b * tokens / optimized(prompts[:b], params)
                rows.append({"target": args.worker, "path": "continuous" if engine.continuous else "static",
                             "prompt_len": plen, "batch_size": b, "max_tokens": tokens,
                             "opt_tokens_per_s": round(opt, 2), "naive_tokens_per_s": round(naive, 2),
                             "speedup": round(opt / naive, 1)})
    engine.close()
    return rows


def markdown(rep: dict) -> str:
    lines = [f"Optimized vs naive generation, {rep['model']} float32, CPU: {rep['cpu']}, numpy copy "
             f"{rep['copy_gbps']} GB/s. Greedy, EOS ignored; OptTokens and NaiveTokens are generated tokens/s.",
             "", f"Command: `python {rep['command']}`", "",
             "| target | PromptLen | BatchSize | MaxTokens | OptTokens | NaiveTokens | Speedup |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rep["rows"]:
        if "reason" in r:
            lines.append(f"| {r['target']} | skipped: {r['reason']} | | | | | |")
            continue
        lines.append(f"| {r['target']} ({r['path']}) | {r['prompt_len']} | {r['batch_size']} | {r['max_tokens']} | "
                     f"{r['opt_tokens_per_s']:.1f} | {r['naive_tokens_per_s']:.2f} | {r['speedup']:.1f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    rows = []
    for target, got, reason in run_targets(__file__, args):
        rows += got if reason is None else [{"target": target, "reason": reason}]
    rep = {"command": command_line(), "model": args.model, "cpu": cpu_model(), "copy_gbps": copy_bandwidth_gbps(),
           "rows": rows}
    write_report(args.out, rep, markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
