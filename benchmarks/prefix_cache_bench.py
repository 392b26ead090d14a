#!/usr/bin/env python
"""Prefix caching: TTFT of a request whose long prompt prefix is cached (warm) vs not (cold).

Each request is a shared "system prompt" of --prefix-len tokens plus --suffix-len distinct tokens,
generating --new-tokens tokens, one request at a time so TTFT is the prefill alone. For each of
--requests pairs: reset the prefix cache, run request i (cold: the prefix is computed and its full
blocks cached), then request i' with another suffix (warm: its prefix blocks are hits, only the
suffix is computed). Medians over the pairs; the same requests with prefix caching off for
reference. One target per subprocess.

    python benchmarks/prefix_cache_bench.py --model random:gpt2 --targets torch:cpu,onnxruntime:cpu \
        --out result/cpu/prefix_cache
"""
from __future__ import annotations

import argparse
import json
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
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--suffix-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--requests", type=int, default=5, help="cold/warm pairs")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> dict:
    import mini_engine  # noqa: F401 - first: it sets OpenBLAS's thread timeout before numpy loads OpenBLAS
    import numpy as np

    from mini_engine import Engine
    from mini_engine.sampling import SamplingParams

    backend, _, device = args.worker.partition(":")
    rng = np.random.default_rng(0)
    prefix = rng.integers(0, 50000, args.prefix_len).tolist()
    suffixes = [rng.integers(0, 50000, args.suffix_len).tolist() for _ in range(2 * args.requests + 1)]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    out = {"target": args.worker}
    for caching in (True, False):
        engine = Engine.from_config(None, model=args.model, backend=backend, device=device or "cpu",
                                    **{"scheduler.enable_prefix_caching": caching})
        if not engine.continuous:
            return out | {"status": "skipped", "reason": engine.static_reason}
        if caching and not engine.config.scheduler.enable_prefix_caching:
            return out | {"status": "skipped", "reason": "; ".join(engine.notes) or "no prefix cache"}
        bm = engine.scheduler.block_manager

        def run(tokens, rid):
            q0, h0 = bm.prefix_queries, bm.prefix_hits
            t = time.perf_counter()
            engine.add_request(rid, tokens, params)
            done = None
            while engine.has_unfinished_requests():
                for o in engine.step():
                    if o.finished:
                        done = o.completion
            return {"ttft_ms": done.ttft_ms, "e2e_ms": (time.perf_counter() - t) * 1e3,
                    "cached": done.cached_prompt_tokens, "queries": bm.prefix_queries - q0,
                    "hits": bm.prefix_hits - h0}

        run(prefix[:32] + suffixes[-1], "warmup")  # compile kernels, touch the paths
        cold, warm = [], []
        for i in range(args.requests):
            bm.reset_prefix_cache()
            cold.append(run(prefix + suffixes[2 * i], f"cold{i}"))
            warm.append(run(prefix + suffixes[2 * i + 1], f"warm{i}"))
        key = "on" if caching else "off"
        out[key] = {"cold": cold, "warm": warm}
        engine.close()
    on, off = out["on"], out["off"]
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    hits = sum(r["hits"] for r in on["warm"])
    queries = sum(r["queries"] for r in on["warm"])
    return out | {"status": "ok", "cold_ttft_ms": med(on["cold"], "ttft_ms"), "warm_ttft_ms": med(on["warm"], "ttft_ms"),
                  "cold_e2e_ms": med(on["cold"], "e2e_ms"), "warm_e2e_ms": med(on["warm"], "e2e_ms"),
                  "off_ttft_ms": med(off["warm"], "ttft_ms"), "off_e2e_ms": med(off["warm"], "e2e_ms"),
                  "warm_hit_rate": hits / queries if queries else 0.0,
                  "warm_cached_tokens": statistics.median(r["cached"] for r in on["warm"])}


def markdown(rep: dict) -> str:
    s = rep["settings"]
    lines = [f"Prefix caching, {s['model']} float32, CPU: {rep['cpu']}, numpy copy {rep['copy_gbps']} GB/s. "
             f"Prompt = {s['prefix_len']}-token shared prefix + {s['suffix_len']} distinct tokens, "
             f"{s['new_tokens']} new tokens, one request at a time; medians of {s['requests']} cold/warm pairs.",
             "", f"Command: `python {rep['command']}`", "",
             "| target | cold TTFT ms | warm TTFT ms | cold / warm | cold e2e ms | warm e2e ms | caching off TTFT ms "
             "| warm prompt tokens cached | warm hit rate |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rep["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['target']} | skipped: {r['reason']} | | | | | | | |")
            continue
        lines.append(f"| {r['target']} | {r['cold_ttft_ms']:.1f} | {r['warm_ttft_ms']:.1f} | "
                     f"{r['cold_ttft_ms'] / r['warm_ttft_ms']:.1f}x | {r['cold_e2e_ms']:.0f} | {r['warm_e2e_ms']:.0f} | "
                     f"{r['off_ttft_ms']:.1f} | {r['warm_cached_tokens']:.0f} | {r['warm_hit_rate']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    rows = [got if reason is None else {"target": target, "status": "skipped", "reason": reason}
            for target, got, reason in run_targets(__file__, args)]
    rep = {"command": command_line(), "cpu": cpu_model(), "copy_gbps": copy_bandwidth_gbps(),
           "settings": {k: getattr(args, k) for k in ("model", "prefix_len", "suffix_len", "new_tokens", "requests")},
           "rows": rows}
    write_report(args.out, rep, markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
