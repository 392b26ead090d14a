"""Probe: ONNX Runtime decode step, GroupQueryAttention graph with a shared in-place KV buffer vs
today's concat export (present = past ++ new, bound with IO binding as the onnxruntime runner does).

For every batch size and context: one decode step (each row has `context` cached tokens and
appends one), timed on both graphs, targets taking turns within each round; prints and writes
the median step time over all rounds. The GQA buffers have a fixed capacity (default 1024) at
every context, as a runner would allocate them; the concat graph gets a past of exactly
`context` tokens. Both sessions run on the CPU provider with the same threads and spinning off
(two sessions in one process would otherwise busy-wait against each other).

    python benchmarks/ort_gqa_probe.py --model random:gpt2 --out result/cpu/ort_gqa_probe.md

Both graphs are built once and cached under --cache-dir (the GQA graph from the weights in
seconds, the concat graph with the torch.onnx exporter in about half a minute). A short parity
check of the GQA graph against the PyTorch forward runs first (--no-validate skips it).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def build_graphs(source, cache_dir: Path, log):
    from mini_engine_export import onnx_gqa as gqa
    from mini_engine_export.onnx_export import export_onnx

    key = source.fingerprint()
    gqa_path = cache_dir / f"gqa-{key}" / "model.onnx"
    if not gqa_path.is_file():
        t = time.perf_counter()
        gqa.build_gqa_graph(source, gqa_path)
        log(f"built the GQA graph in {time.perf_counter() - t:.1f} s: {gqa_path}")
    t = time.perf_counter()
    concat = export_onnx(source, cache_dir / f"concat-last-{key}", logits="last", validate=False, log=log)
    if not concat.reused:
        log(f"exported the concat graph in {time.perf_counter() - t:.1f} s")
    return gqa_path, concat.model_file


class GqaTarget:
    name = "gqa shared buffer"

    def __init__(self, path, cfg, slots: int, capacity: int, threads: int):
        from mini_engine_export import onnx_gqa as gqa

        self.gqa, self.cfg, self.capacity = gqa, cfg, capacity
        self.session = gqa.cpu_session(path, threads)
        self.kv = gqa.GqaKV.allocate(cfg, slots, capacity)
        for buf in self.kv.keys + self.kv.values:
            buf.fill(0.01)  # touch every page now, not inside the first timed steps

    def prepare(self, batch: int, context: int):
        feeds = self.gqa.step_inputs([[1]] * batch, [context] * batch, self.capacity, self.cfg.n_positions)
        # Each run writes position `context` again, so repeated steps keep the same context.
        return lambda: self.gqa.run_step(self.session, self.kv, feeds)


class ConcatTarget:
    name = "concat export"

    def __init__(self, path, cfg, threads: int):
        from mini_engine_export import onnx_gqa as gqa

        self.cfg = cfg
        self.session = gqa.cpu_session(path, threads)
        self.past_names = [i.name for i in self.session.get_inputs()][3:]
        self.present_names = [o.name for o in self.session.get_outputs()][1:]

    def prepare(self, batch: int, context: int):
        from onnxruntime import OrtValue

        cfg = self.cfg
        # Values do not change the cost; np.full is quick and touches every page.
        past = [OrtValue.ortvalue_from_numpy(np.full((batch, cfg.n_head, context, cfg.head_dim), 0.01, np.float32))
                for _ in self.past_names]
        feeds = {"input_ids": np.ones((batch, 1), np.int64),
                 "position_ids": np.full((batch, 1), context, np.int64),
                 "attention_mask": np.ones((batch, context + 1), np.int64)}

        def step():
            # As the runner's step: bind the past, let ORT allocate present = past ++ new.
            io = self.session.io_binding()
            for name, array in feeds.items():
                io.bind_cpu_input(name, array)
            for name, value in zip(self.past_names, past):
                io.bind_ortvalue_input(name, value)
            io.bind_output("logits", "cpu")
            for name in self.present_names:
                io.bind_output(name, "cpu")
            self.session.run_with_iobinding(io)
            return io.get_outputs()[0].numpy()

        return step


def time_steps(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:gpt2")
    ap.add_argument("--contexts", default="64,256,512,1000")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--capacity", type=int, default=1024, help="GQA buffer length (tokens per row)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per target, case and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = one per physical core)")
    ap.add_argument("--cache-dir", default="/tmp/mini-engine-gqa-probe")
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--out", default="", help="markdown file to write the results to")
    args = ap.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    batches = [int(x) for x in args.batch_sizes.split(",")]
    if max(contexts) + 1 > args.capacity:
        sys.exit(f"--capacity {args.capacity} cannot hold a context of {max(contexts)} plus the new token")

    import onnxruntime

    from mini_engine.model.source import resolve_model

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    source = resolve_model(args.model)
    cfg = source.config
    gqa_path, concat_path = build_graphs(source, Path(args.cache_dir), log)

    validation = []
    if not args.no_validate:
        from mini_engine_export import onnx_gqa as gqa

        results = gqa.validate_gqa_graph(gqa_path, source, capacity=32, session=gqa.cpu_session(gqa_path, args.threads))
        for r in results:
            validation.append(f"| {r.step} | {' '.join(map(str, r.new_tokens))} | {r.rows[0]}:{r.rows[1]} | "
                              f"{r.logits_diff:.1e} | {r.kv_diff:.1e} | {'pass' if r.passed else 'FAIL'} |")
        log(f"validation: max |logits diff| {max(r.logits_diff for r in results):.1e}, "
            f"{'passed' if all(r.passed for r in results) else 'FAILED'}")

    targets = [GqaTarget(gqa_path, cfg, max(batches), args.capacity, args.threads),
               ConcatTarget(concat_path, cfg, args.threads)]
    load_before = os.getloadavg()
    times: dict[tuple, list[float]] = {}
    for rnd in range(args.rounds):
        order = targets if rnd % 2 == 0 else targets[::-1]
        for b in batches:
            for ctx in contexts:
                for target in order:
                    step = target.prepare(b, ctx)
                    times.setdefault((target.name, b, ctx), []).extend(time_steps(step, 1, args.steps))
                    del step
        log(f"round {rnd + 1}/{args.rounds} done ({time.perf_counter() - t_start:.0f} s)")
    load_after = os.getloadavg()

    rows = ["| batch | context | gqa shared buffer: median (min) ms | concat export: median (min) ms "
            "| concat / gqa (medians) |", "|---:|---:|---:|---:|---:|"]
    for b in batches:
        for ctx in contexts:
            g, c = (times[(t.name, b, ctx)] for t in targets)
            gm, cm = statistics.median(g) * 1e3, statistics.median(c) * 1e3
            rows.append(f"| {b} | {ctx} | {gm:.1f} ({min(g) * 1e3:.1f}) | {cm:.1f} ({min(c) * 1e3:.1f}) "
                        f"| {cm / gm:.2f}x |")
    command = "python benchmarks/ort_gqa_probe.py " + " ".join(sys.argv[1:])
    header = [
        "# ONNX Runtime decode step: GroupQueryAttention shared buffer vs concat export",
        "",
        f"Command: `{command}`",
        "",
        f"- {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, CPU: {cpu_model()}, "
        f"{os.cpu_count()} logical CPUs, onnxruntime {onnxruntime.__version__}, CPUExecutionProvider, "
        f"intra-op threads {args.threads or 'default'}, spinning off",
        f"- {args.model} float32; GQA buffers [slots={max(batches)}, {cfg.n_head}, {args.capacity}, {cfg.head_dim}] "
        f"per layer; concat graph = `export_onnx(..., logits=\"last\")`, past of exactly `context` tokens",
        f"- median of {args.rounds} rounds x {args.steps} steps (after 1 warm-up step per case), "
        f"targets alternating order each round; load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after; total {time.perf_counter() - t_start:.0f} s",
        "",
    ]
    body = header + rows
    if validation:
        body += ["", f"GQA graph vs the PyTorch forward (`validate_gqa_graph`, capacity 32; new tokens per row "
                     f"per step, 0 = idle row; rows = bound cache rows):", "",
                 "| step | new tokens | rows | max abs logits diff | max abs KV diff | result |",
                 "|---:|---|---|---:|---:|---|"] + validation
    text = "\n".join(body) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
