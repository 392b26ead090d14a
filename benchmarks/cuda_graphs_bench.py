#!/usr/bin/env python
"""Decode speed of the PyTorch backend on CUDA: eager vs CUDA graphs.

Both runners hold the same seeded weights and run the same greedy generations
(prompt of --prompt-len random token ids, --new-tokens new tokens, EOS ignored);
the script also checks that the two produce the same tokens.

    python benchmarks/cuda_graphs_bench.py --model random:gpt2 --dtype float16 \
        --batch-sizes 1,8 --out result/gpu/cuda_graphs

Throughput = batch x new tokens / wall time of the whole generation (prefill included).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    return p.parse_args(argv)


def measure(engine, batch: list[list[int]], new_tokens: int, runs: int) -> dict:
    import torch

    from mini_engine.sampling import SamplingParams
    from mini_engine.sequence import Sequence

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    def once():
        seqs = [Sequence(i, "", ids) for i, ids in enumerate(batch)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        done = engine.generate_batch(seqs, params)
        torch.cuda.synchronize()
        return time.perf_counter() - t, [c.token_ids for c in done]

    first_s, tokens = once()  # warm-up; with graphs this includes capturing them
    times = [once()[0] for _ in range(runs)]
    med = statistics.median(times)
    return {"first_run_s": first_s, "seconds_median": med, "times_s": times,
            "tokens_per_s": len(batch) * new_tokens / med, "tokens": tokens,
            "runner": engine.runner.describe()}


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from mini_engine import Engine

    if not torch.cuda.is_available():
        print("error: no CUDA device visible to PyTorch; this benchmark needs one", file=sys.stderr)
        return 2
    engines = {mode: Engine(model=args.model, backend="torch", device=args.device, dtype=args.dtype,
                            enforce_eager=(mode == "eager"))
               for mode in ("eager", "cuda_graphs")}
    rng = np.random.default_rng(1234)
    rows = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        batch = [rng.integers(0, 50000, args.prompt_len).tolist() for _ in range(b)]
        res = {mode: measure(e, batch, args.new_tokens, args.runs) for mode, e in engines.items()}
        same = res["eager"]["tokens"] == res["cuda_graphs"]["tokens"]
        agree = np.mean([x == y for r1, r2 in zip(res["eager"]["tokens"], res["cuda_graphs"]["tokens"])
                         for x, y in zip(r1, r2)])
        row = {"batch_size": b, "tokens_identical": same, "token_agreement": float(agree),
               "speedup": res["cuda_graphs"]["tokens_per_s"] / res["eager"]["tokens_per_s"]}
        for mode, r in res.items():
            row[mode] = {k: v for k, v in r.items() if k != "tokens"}
        rows.append(row)
        print(f"batch {b:3d}: eager {res['eager']['tokens_per_s']:8.1f} tokens/s, cuda graphs "
              f"{res['cuda_graphs']['tokens_per_s']:8.1f} tokens/s ({row['speedup']:.2f}x), "
              f"tokens identical: {same}", file=sys.stderr)
    for e in engines.values():
        e.close()
    props = torch.cuda.get_device_properties(torch.device(args.device))
    report = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "device": {"name": props.name, "capability": f"{props.major}.{props.minor}",
                         "torch": torch.__version__, "cuda": torch.version.cuda},
              "settings": {k: getattr(args, k) for k in ("model", "dtype", "prompt_len", "new_tokens", "runs")},
              "rows": rows}
    text = markdown(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
    print(text)
    return 0


def markdown(report: dict) -> str:
    s, d = report["settings"], report["device"]
    lines = [f"PyTorch backend on {d['name']} (compute {d['capability']}, torch {d['torch']}, CUDA {d['cuda']}): "
             f"greedy generation, {s['model']} {s['dtype']}, prompt {s['prompt_len']} tokens, "
             f"{s['new_tokens']} new tokens, median of {s['runs']} runs after one warm-up run.", "",
             f"Command: `{report['command']}`", "",
             "| batch | eager tokens/s | CUDA graphs tokens/s | speedup | same tokens | first run with graphs (s) |",
             "|---:|---:|---:|---:|---|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['batch_size']} | {r['eager']['tokens_per_s']:.1f} | {r['cuda_graphs']['tokens_per_s']:.1f} "
                     f"| {r['speedup']:.2f}x | {'yes' if r['tokens_identical'] else 'no (%.1f%% agree)' % (100 * r['token_agreement'])} "
                     f"| {r['cuda_graphs']['first_run_s']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
