#!/usr/bin/env python
"""Does the KV block size change continuous batching's throughput on the mixed-length workload?

The torch backend asks the scheduler for 128-token blocks because its paged-attention kernel reads
long contexts faster with them (benchmarks/long_context_bench.py --block-sizes). This checks the
other side on the issue's fixed workload (64 requests, prompts 16-256, outputs 16-256, EOS ignored,
all submitted at once): one engine per block size, served in turn, --rounds times, through the same
path `mini-engine bench --mode continuous` measures (mini_engine/bench/continuous.py).

    python benchmarks/block_size_bench.py --model random:gpt2 --backend torch --block-sizes 16,128 --rounds 2 \
        --out result/cpu/block_size
    python benchmarks/block_size_bench.py --requests 16 --prompt-lens 32:32 --output-lens 64:64 --rounds 5 ...

Reported per block size: tokens/s, mean rows per step, step ms, TTFT p95, the median over rounds,
and each round's tokens/s relative to the first block size of the same round.
"""
import mini_engine  # noqa: F401 - before numpy (OpenBLAS settings)

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import command_line, copy_bandwidth_gbps, cpu_model, write_report  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--backend", default="torch")
    p.add_argument("--block-sizes", default="16,128")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-lens", default="16:256", help="LO:HI, uniform (the fixed workload's 16:256)")
    p.add_argument("--output-lens", default="16:256", help="LO:HI, uniform, EOS ignored")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    a = p.parse_args(argv)
    try:
        sizes = [int(x) for x in a.block_sizes.split(",")]
        plens, olens = (tuple(int(x) for x in v.split(":")) for v in (a.prompt_lens, a.output_lens))
        if len(plens) != 2 or len(olens) != 2 or min(plens + olens) < 1:
            raise ValueError
    except ValueError:
        print("error: --block-sizes takes comma-separated integers, --prompt-lens and --output-lens LO:HI "
              "(positive integers)", file=sys.stderr)
        return 2
    if a.rounds < 1 or a.requests < 1 or any(s < 1 for s in sizes):
        print("error: --rounds, --requests and every block size must be >= 1", file=sys.stderr)
        return 2

    from mini_engine import Engine
    from mini_engine.bench.continuous import Workload, _served, _warm_up

    engines = {bs: Engine.from_config(None, model=a.model, backend=a.backend, **{"scheduler.block_size": bs})
               for bs in sizes}
    try:
        first = engines[sizes[0]]
        wl = Workload.make(a.requests, plens, olens, 0, first.source.config.vocab_size)
        params = first.sampling_params(ignore_eos=True, max_new_tokens=max(wl.outputs))
        for e in engines.values():
            if not e.continuous:
                print(f"error: {a.backend} runs static batching here: {e.static_reason}", file=sys.stderr)
                return 2
            _warm_up(e, wl, params)
        runs = {bs: [] for bs in sizes}
        for _ in range(a.rounds):
            for bs, e in engines.items():
                runs[bs].append(_served(e, "generate", wl, params, 16, None, e.runner.kv_bytes_per_token))
    finally:
        for e in engines.values():
            e.close()

    rows = []
    for bs in sizes:
        got = runs[bs]
        rows.append({"block_size": bs,
                     "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in got), 1),
                     "rounds_tokens_per_s": [r["tokens_per_s"] for r in got],
                     "vs_first": [round(r["tokens_per_s"] / r0["tokens_per_s"], 3) for r, r0 in zip(got, runs[sizes[0]])],
                     "rows_per_step": round(statistics.median(r["mean_rows_per_step"] for r in got), 1),
                     "step_ms": round(statistics.median(r["step_ms_mean"] for r in got), 1),
                     "ttft_p95_ms": round(statistics.median(r["ttft_p95_ms"] for r in got))})
    report = {"command": command_line(), "model": a.model, "backend": a.backend, "cpu": cpu_model(),
              "cores": os.cpu_count(), "copy_gbps": copy_bandwidth_gbps(), "rounds": a.rounds,
              "requests": a.requests, "rows": rows}
    lines = [f"Continuous batching by KV block size, {a.model} on {a.backend}:cpu, CPU: {report['cpu']} "
             f"({report['cores']} cores), numpy copy bandwidth {report['copy_gbps']} GB/s; {a.requests} requests "
             f"(prompts {a.prompt_lens}, outputs {a.output_lens} tokens, EOS ignored) in a burst, max_num_seqs 16; "
             f"median of {a.rounds} "
             "rounds, block sizes in turn within each round.", "", f"Command: `python {report['command']}`", "",
             "| block size | tokens/s | per round vs first block size | rows/step | step ms | TTFT p95 ms |",
             "|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['block_size']} | {r['tokens_per_s']} | {' / '.join(f'{x:.2f}x' for x in r['vs_first'])} | "
                     f"{r['rows_per_step']} | {r['step_ms']} | {r['ttft_p95_ms']} |")
    write_report(a.out, report, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
