#!/usr/bin/env python
"""Tensor parallelism on CPU: TP=1 against TP=2 through the engine (continuous batching), greedy.

    flock /tmp/mini-bench.lock python benchmarks/tp_bench.py --models random:gpt2 \
        --batch-sizes 1,16 --rounds 3 --out result/cpu/tp/tp_bench_gpt2

Targets (--targets): `tp1` is the one-process default (at batch 1 its numpy GEMV path, gemv=auto),
`tp1-torch` the same process on the torch path that TP ranks run (gemv=off: the like-for-like
baseline at batch 1), `tp2` two ranks (the engine's process and one spawned), cores / 2 threads
each. Each (round, model, batch, target) runs in a fresh interpreter: a warm-up generation, then
--runs timed ones of batch x --prompt-len random prompt tokens and --new-tokens new tokens; targets
take turns within a round and every ratio to tp1 is taken within a round.

Per run: tokens/s (batch x new tokens / wall time, prefill included), the median decode step,
rank 0's time per step inside all-reduces (2 per block; includes waiting for the slower rank) and
the logits gather, the step's send to the other ranks (a pipe write), and the bandwidth the decode
step achieved: the model's weight bytes (all ranks together) / decode step time. Other processes'
CPU use during each run is recorded (this machine is shared): `others` = cores busy outside this
benchmark's processes, from /proc/stat less our process tree.
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
sys.path.insert(0, str(HERE))
from bench_common import uptime  # noqa: E402

TARGETS = {"tp1": {}, "tp1-torch": {"gemv": "off"}, "tp2": {"tensor_parallel_size": 2},
           "tp2-gloo": {"tensor_parallel_size": 2, "tp_comm": "gloo"}}


def busy_jiffies() -> int:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # everything but idle and iowait


def tree_cpu_s() -> float:
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def worker(args) -> dict:
    import numpy as np

    from mini_engine import Engine
    from mini_engine.sampling import SamplingParams

    opts = {f"backend.options.{k}": v for k, v in TARGETS[args.worker].items()}
    engine = Engine.from_config(None, model=args.model, backend="torch",
                                **opts, **{"scheduler.max_num_seqs": max(16, args.batch)})
    runner = engine.runner
    rng = np.random.default_rng(0)
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    decode: list[float] = []
    execute = runner.execute_paged

    def timed(step):
        t = time.perf_counter()
        out = execute(step)
        if step.is_decode:
            decode.append(time.perf_counter() - t)
        return out

    runner.execute_paged = timed
    tp = runner.tp
    runs = []
    for i in range(args.runs + 1):  # the first is the warm-up
        prompts = [rng.integers(0, 50000, args.prompt_len).tolist() for _ in range(args.batch)]
        decode.clear()
        before = tp.stats() if tp else None
        steps0 = engine.num_steps
        jiffies, mine = busy_jiffies(), tree_cpu_s()
        t = time.perf_counter()
        for j, p in enumerate(prompts):
            engine.add_request(f"r{i}-{j}", p, params)
        while engine.has_unfinished_requests():
            engine.step()
        wall = time.perf_counter() - t
        hz = os.sysconf("SC_CLK_TCK")
        others = max(0.0, (busy_jiffies() - jiffies) / hz - (tree_cpu_s() - mine)) / wall
        steps = engine.num_steps - steps0
        run = {"wall_s": wall, "tokens_per_s": args.batch * args.new_tokens / wall, "steps": steps,
               "decode_step_ms": statistics.median(decode) * 1e3, "others_cores": others}
        if tp:
            after = tp.stats()
            d = {k: after[k] - before[k] for k in after}
            run.update({"all_reduce_ms_per_step": d["all_reduce_s"] / d["steps"] * 1e3,
                        "all_reduce_calls_per_step": d["all_reduce_calls"] / d["steps"],
                        "all_reduce_mb_per_step": d["all_reduce_bytes"] / d["steps"] / 1e6,
                        "gather_ms_per_step": d["gather_s"] / d["steps"] * 1e3,
                        "send_ms_per_step": d["send_s"] / d["steps"] * 1e3})
        runs.append(run)
    info = runner.describe()
    weight_bytes = runner.weight_bytes
    engine.close()
    timed_runs = runs[1:]
    med = {k: statistics.median(r[k] for r in timed_runs) for k in timed_runs[0]}
    return {"target": args.worker, "model": args.model, "batch": args.batch, "runs": timed_runs, **med,
            "weight_bytes": weight_bytes, "decode_gbps": weight_bytes / (med["decode_step_ms"] / 1e3) / 1e9,
            "threads": info.get("threads"), "gemv": info.get("gemv"),
            "tensor_parallel": {k: v for k, v in (info.get("tensor_parallel") or {}).items()
                                if k in ("size", "threads_per_rank", "per_rank", "embeddings", "lm_head")} or None}


def cpu_model() -> str:
    from bench_common import cpu_model as model

    return f"{model()} ({len(os.sched_getaffinity(0))} cores)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="random:gpt2,random:gpt2-medium")
    ap.add_argument("--targets", default="tp1,tp1-torch,tp2")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    targets = args.targets.split(",")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown target '{unknown[0]}' (known: {', '.join(TARGETS)})")
    models, batches = args.models.split(","), [int(b) for b in args.batch_sizes.split(",")]
    load_before = uptime()
    print(cpu_model(), "|", load_before, file=sys.stderr)
    rows = []
    for rnd in range(args.rounds):
        for model in models:
            for batch in batches:
                for target in targets:
                    cmd = [sys.executable, __file__, "--worker", target, "--model", model, "--batch", str(batch),
                           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                           "--runs", str(args.runs)]
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode:
                        raise SystemExit(f"{target} {model} batch {batch}: "
                                         f"{(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
                    r = json.loads(proc.stdout.strip().splitlines()[-1])
                    r["round"] = rnd
                    rows.append(r)
                    extra = (f", all-reduce {r['all_reduce_ms_per_step']:.2f} ms/step"
                             if "all_reduce_ms_per_step" in r else "")
                    print(f"round {rnd} {model} b{batch} {target}: {r['tokens_per_s']:.1f} tok/s, decode step "
                          f"{r['decode_step_ms']:.2f} ms{extra}, others {r['others_cores']:.2f} cores",
                          file=sys.stderr, flush=True)
    report = {"command": "python benchmarks/tp_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "cpu": cpu_model(), "load_before": load_before, "load_after": uptime(), "rows": rows}
    text = render(report, models, batches, targets)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)


def render(report: dict, models, batches, targets) -> str:
    rows = report["rows"]
    med = statistics.median
    lines = [f"command: `{report['command']}`", f"CPU: {report['cpu']}",
             f"load before: `{report['load_before']}`", f"load after: `{report['load_after']}`", "",
             "Medians over rounds (each round's figure is the median of its timed runs). `x tp1`: the ratio to tp1 "
             "within each round, median. Step times are rank 0's; all-reduce and gather include waiting for the "
             "slower rank. GB/s: the model's weight bytes (all ranks together) / decode step.", "",
             "| model | batch | target | threads | tok/s | per round | x tp1 | decode step ms | all-reduce ms/step "
             "| gather ms/step | send ms/step | all-reduce MB/step | GB/s | others (cores) |",
             "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model in models:
        for batch in batches:
            for target in targets:
                mine = [r for r in rows if r["model"] == model and r["batch"] == batch and r["target"] == target]
                if not mine:
                    continue
                ratios = []
                for r in mine:
                    ref = [f for f in rows if f["round"] == r["round"] and f["model"] == model
                           and f["batch"] == batch and f["target"] == "tp1"]
                    if ref:
                        ratios.append(r["tokens_per_s"] / ref[0]["tokens_per_s"])
                tp = mine[0].get("tensor_parallel")
                threads = f"{tp['size']} x {tp['threads_per_rank']}" if tp else str(mine[0]["threads"])

                def col(key, fmt=".2f"):
                    vals = [r[key] for r in mine if key in r]
                    return format(med(vals), fmt) if vals else "-"

                lines.append(
                    f"| {model} | {batch} | {target} | {threads} | {col('tokens_per_s', '.1f')} | "
                    f"{', '.join(format(r['tokens_per_s'], '.1f') for r in mine)} | "
                    f"{format(med(ratios), '.2f') if ratios else '-'} | {col('decode_step_ms')} | "
                    f"{col('all_reduce_ms_per_step')} | {col('gather_ms_per_step')} | {col('send_ms_per_step', '.3f')} | "
                    f"{col('all_reduce_mb_per_step', '.3f')} | {col('decode_gbps', '.1f')} | {col('others_cores')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
