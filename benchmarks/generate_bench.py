#!/usr/bin/env python
"""Greedy generation throughput: mini-engine backends vs Hugging Face `generate()`.

Same weights for every target (the engine's seeded random GPT-2 is copied into a
transformers GPT2LMHeadModel), one target per subprocess so thread pools do not
distort each other, the median of --runs timed runs after a warm-up. With --rounds N the
whole sweep repeats N times, targets taking turns, and every ratio to `generate()` is taken
within a round: on a machine whose speed drifts over minutes, ratios from one round are
comparable where absolute figures from different minutes are not.

    python benchmarks/generate_bench.py --model random:gpt2 --batch-sizes 1,16 \
        --targets hf:cpu,torch:cpu,onnxruntime:cpu --out result/cpu/generate_bench

Throughput = batch x new tokens / wall time of the whole generation (prefill included).
For mini-engine targets the last run is split into prefill, the median decode step, and
engine overhead (wall time not spent inside the runner: scheduling, sampling, bookkeeping).
mini-engine targets run the engine's generation path: continuous batching where the backend
has the paged contract, else static batching; `@path=static` forces the static path
(Engine.generate_batch) for comparison, e.g. torch:cpu@path=static.

Precision per target: `@int8` (or `@dtype=int8`) sets that target's model.dtype, so int8 and
float32 compare in one run (`--targets onnxruntime:cpu@float32,onnxruntime:cpu@int8`); `vs f32` is
the ratio to the same backend's float32 target in the same round. Each row records the weight
bytes one step reads at its precision, the bandwidth the median decode step achieved
(weight bytes / step time), and the floor: weight bytes / this machine's memory bandwidth
(numpy copy, measured once before the targets run).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import peer_targets  # stdlib only at import; the peers' packages load in their workers


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--targets", default="hf:cpu,torch:cpu",
                   help="comma list of BACKEND:DEVICE[@DTYPE][@KEY=VALUE...]; 'hf' is transformers.generate(); "
                        "@DTYPE (float32, bfloat16, int8, int4...) is the target's precision; "
                        "@KEY=VALUE sets a backend option for that target, e.g. torch:cpu@gemv=off")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the sweep, targets taking turns; ratios to hf are taken per round")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="config override for every mini-engine target, e.g. generation.seed=0")
    p.add_argument("--option", dest="options", action="append", default=[], metavar="BACKEND.KEY=VALUE",
                   help="backend option for that backend's targets only, e.g. torch.linear=aten or "
                        "onnxruntime.onnx_path=\"exports/gpt2\"")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prompts(batch: int, length: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(1234)
    return [rng.integers(0, 50000, length).tolist() for _ in range(batch)]


def time_runs(fn, runs: int) -> list[float]:
    fn()  # warm-up: allocations, oneDNN primitive creation, lazy init
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def hf_gpt2(model: str):
    """A transformers GPT2LMHeadModel with the engine's weights for `model` (for random:* the engine's
    seeded weights copied in), so every target, peers included, runs the same network."""
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    from mini_engine.model.source import resolve_model
    from mini_engine.model.weights import build_model

    source = resolve_model(model)
    if not source.is_random:
        return GPT2LMHeadModel.from_pretrained(source.path)
    ours = build_model(source, "float32", "cpu")
    c = source.config
    hf = GPT2LMHeadModel(HFConfig(vocab_size=c.vocab_size, n_positions=c.n_positions, n_embd=c.n_embd,
                                  n_layer=c.n_layer, n_head=c.n_head))
    state = {}
    for k, v in ours.state_dict().items():
        if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            v = v.t()
        state["transformer." + k] = v
    state["lm_head.weight"] = ours.wte.weight
    hf.load_state_dict(state, strict=False)
    return hf


def first_tokens(rows: list[list[int]], n: int = 8) -> list[list[int]]:
    """The first greedy tokens of every row: the report checks peers against transformers with them."""
    return [[int(t) for t in row[:n]] for row in rows]


def worker_hf(args, device: str) -> dict:
    import torch

    hf = hf_gpt2(args.model)
    wanted = getattr(args, "target_dtype", None) or args.dtype
    if wanted not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"hf: transformers.generate() runs here in float32, bfloat16 or float16, not {wanted}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[wanted]
    hf = hf.to(device=device, dtype=dtype).eval()
    ids = torch.tensor(prompts(args.batch, args.prompt_len), device=device)

    out = []

    def run():
        with torch.inference_mode():
            out[:] = [hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=50256)]
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times = time_runs(run, args.runs)
    return {"threads": torch.get_num_threads(), "times_s": times,
            "first_tokens": first_tokens(out[0][:, ids.shape[1]:].tolist()),
            "library": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}"}


def worker_engine(args, backend: str, device: str, target_options: list[str]) -> dict:
    from mini_engine import Engine, load_config
    from mini_engine.sampling import SamplingParams
    from mini_engine.sequence import Sequence

    path = next((o.partition("=")[2] for o in target_options if o.startswith("path=")), "auto")
    target_options = [o for o in target_options if not o.startswith("path=")]
    if path not in ("auto", "static", "continuous"):
        raise SystemExit(f"@path must be static or continuous, got '{path}'")

    options = [f"backend.options.{o.partition('.')[2]}" for o in args.options if o.startswith(backend + ".")]
    options += [f"backend.options.{o}" for o in target_options]
    cfg = load_config(None, args.overrides + options, **{"model.source": args.model, "backend.name": backend,
                                               "backend.device": device,
                                               "model.dtype": getattr(args, "target_dtype", None) or args.dtype,
                                               "batching.max_batch_size": args.batch})
    cfg.scheduler.max_num_seqs = max(cfg.scheduler.max_num_seqs, args.batch)
    engine = Engine(config=cfg)
    continuous = engine.continuous and path != "static"
    if path == "continuous" and not continuous:
        raise SystemExit(f"{backend}: no continuous batching here ({engine.static_reason})")
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    batch = prompts(args.batch, args.prompt_len)
    ttft = []
    steps: list[tuple[int, float]] = []  # (new tokens per row, seconds) of every runner call
    execute = engine.runner.execute
    execute_paged = engine.runner.execute_paged

    def timed_execute(step):
        t = time.perf_counter()
        out = execute(step)
        steps.append((step.seq_len, time.perf_counter() - t))
        return out

    def timed_execute_paged(step):
        t = time.perf_counter()
        out = execute_paged(step)
        steps.append((1 if step.is_decode else 2, time.perf_counter() - t))
        return out

    # where the time goes: runner vs engine (scheduling, sampling, bookkeeping)
    engine.runner.execute = timed_execute
    engine.runner.execute_paged = timed_execute_paged
    runs_done = [0]
    generated: list[list[int]] = []

    def run():
        steps.clear()
        if continuous:
            # Distinct requests every run, so the prefix cache does not serve a rerun's prompts.
            engine.scheduler.block_manager.reset_prefix_cache()
            ids = [engine.add_request(f"r{runs_done[0]}-{i}", p, params).request_id for i, p in enumerate(batch)]
            done = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out.completion
            done = [done[i] for i in ids]
        else:
            seqs = [Sequence(i, "", ids) for i, ids in enumerate(batch)]
            done = engine.generate_batch(seqs, params)
        runs_done[0] += 1
        assert all(len(c.token_ids) == args.new_tokens for c in done)
        ttft.append(done[0].ttft_ms)
        generated[:] = [list(c.token_ids) for c in done]

    times = time_runs(run, args.runs)
    decode = [s for n, s in steps if n == 1]
    info = engine.runner.describe()
    quant = info.get("quantization")
    weight_bytes = engine.runner.weight_bytes  # at the precision run (quantized weights and their scales)
    return {"times_s": times, "ttft_ms": statistics.median(ttft[1:]), "runner": engine.describe(),
            "first_tokens": first_tokens(generated),
            "path": "continuous" if continuous else "static",
            "dtype": info.get("dtype", cfg.model.dtype),
            "quantization": (quant.get("description") or quant.get("method")) if isinstance(quant, dict) else quant,
            "weight_bytes": weight_bytes,
            # weight bytes / median decode step: the weight-streaming rate the decode step achieved
            "decode_bandwidth_gbps": weight_bytes / statistics.median(decode) / 1e9 if decode else None,
            # from the last run: prefill, median decode step, and what the runner did not spend
            "prefill_ms": sum(s for n, s in steps if n > 1) * 1e3,
            "decode_step_ms": statistics.median(decode) * 1e3 if decode else None,
            "engine_overhead_ms": (times[-1] - sum(s for _, s in steps)) * 1e3}


DTYPES = ("float32", "float16", "bfloat16", "int8", "int4")


def parse_target(spec: str) -> tuple[str, str, list[str], str | None]:
    """'BACKEND:DEVICE[@DTYPE][@KEY=VALUE...]' -> (backend, device, ['KEY=VALUE', ...], dtype or None)."""
    target, *items = spec.split("@")
    target_options, dtype = [], None
    backend, _, device = target.partition(":")
    dtypes = peer_targets.DTYPES[backend] if backend in peer_targets.BACKENDS else DTYPES
    for option in items:
        if "=" not in option and option not in dtypes and backend in peer_targets.BACKENDS:
            peer_targets.check_target(backend, option, [])
        if "=" not in option and option not in dtypes:
            raise SystemExit(f"target option '@{option}' must be KEY=VALUE, e.g. torch:cpu@gemv=off")
        value = option.partition("=")[2] if option.startswith("dtype=") else option if "=" not in option else None
        if value is not None:
            if value not in dtypes or dtype is not None:
                raise SystemExit(f"target '{spec}': '@{option}' must be one precision of {', '.join(dtypes)}, "
                                 f"e.g. torch:cpu@int8")
            dtype = value
        else:
            target_options.append(option)
    if backend in peer_targets.BACKENDS:
        peer_targets.check_target(backend, dtype, target_options)
    return backend, device or "cpu", target_options, dtype


def run_worker(args) -> None:
    backend, device, target_options, args.target_dtype = parse_target(args.worker)
    if backend in peer_targets.BACKENDS:
        result = peer_targets.run_worker(args, backend, args.target_dtype, hf_gpt2=hf_gpt2, prompts=prompts,
                                         time_runs=time_runs, first_tokens=first_tokens)
    elif backend == "hf":
        result = worker_hf(args, device)
    else:
        result = worker_engine(args, backend, device, target_options)
    print(json.dumps(result))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return 0
    if args.rounds < 1 or args.runs < 1:
        raise SystemExit("--rounds and --runs must be >= 1")
    targets = args.targets.split(",")
    for target in targets:
        backend = parse_target(target)[0]
        if backend in peer_targets.BACKENDS:
            peer_targets.require(backend)  # a missing peer fails now, in one line, not after the others ran
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        raise SystemExit(f"--batch-sizes must be a comma list of integers, got '{args.batch_sizes}'") from None
    from mini_engine.bench.metrics import memory_bandwidth_gbps

    bandwidth = memory_bandwidth_gbps()  # before any target runs, on a quiet process
    rows = []
    for rnd in range(args.rounds):
        for target in targets:
            for batch in batch_sizes:
                rows.append(dict(run_target(args, target, batch), round=rnd))
    add_ratios(rows)
    for r in rows:
        if r["status"] == "ok" and r.get("weight_bytes"):
            r["floor_ms"] = r["weight_bytes"] / (bandwidth * 1e9) * 1e3  # one step reading every weight once
    report = {"command": " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "machine": dict(cpu_facts(), platform=platform.platform(), processor=platform.processor(),
                              cpus=__import__("os").cpu_count(), memory_bandwidth_gbps=round(bandwidth, 2)),
              "settings": {"model": args.model, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                           "runs": args.runs, "rounds": args.rounds, "dtype": args.dtype, "overrides": args.overrides,
                           "options": args.options},
              "rows": rows}
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def run_target(args, target: str, batch: int) -> dict:
    """One worker subprocess: a target at one batch size, --runs timed generations."""
    cmd = [sys.executable, __file__, "--worker", target, "--batch", str(batch), "--model", args.model,
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           "--runs", str(args.runs), "--dtype", args.dtype] + [f"--set={o}" for o in args.overrides] \
        + [f"--option={o}" for o in args.options]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        print(f"{target:18s} batch {batch:3d}: skipped ({reason})", file=sys.stderr)
        return {"target": target, "batch_size": batch, "status": "skipped", "reason": reason}
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    med = statistics.median(r["times_s"])
    row = {"target": target, "batch_size": batch, "status": "ok",
           "tokens_per_s": batch * args.new_tokens / med,
           "tokens_per_s_runs": [round(batch * args.new_tokens / t, 2) for t in r["times_s"]],
           "seconds_median": med}
    row.update({k: v for k, v in r.items() if k != "times_s"})
    print(f"{target:18s} batch {batch:3d}: {row['tokens_per_s']:8.1f} tokens/s "
          f"(runs: {row['tokens_per_s_runs']})", file=sys.stderr)
    return row


def cpu_facts() -> dict:
    """lscpu's model name and the int8 dot-product extensions present (figures depend on them)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    return {"cpu": model, "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": " avx_vnni" in flags,
            "avx2": " avx2" in flags}


def _without_dtype(target: str) -> str:
    backend, device, options, _ = parse_target(target)
    return "@".join([f"{backend}:{device}"] + options)


def add_ratios(rows: list[dict]) -> None:
    """vs_hf: tokens/s over the hf target's at the same batch size in the same round. vs_float32: over
    the same backend's float32 target (same device and options) at the same batch size and round."""
    hf: dict[tuple[int, int], float] = {}
    f32: dict[tuple[int, int, str], float] = {}
    for r in rows:  # the first hf target of a round is the reference
        if r["target"].startswith("hf") and r["status"] == "ok":
            hf.setdefault((r["round"], r["batch_size"]), r["tokens_per_s"])
        if r["status"] == "ok" and r.get("dtype", "float32") == "float32":
            f32.setdefault((r["round"], r["batch_size"], _without_dtype(r["target"])), r["tokens_per_s"])
    for r in rows:
        if r["status"] == "ok" and (r["round"], r["batch_size"]) in hf:
            r["vs_hf"] = r["tokens_per_s"] / hf[r["round"], r["batch_size"]]
        key = (r["round"], r["batch_size"], _without_dtype(r["target"]))
        if r["status"] == "ok" and r.get("dtype", "float32") != "float32" and key in f32:
            r["vs_float32"] = r["tokens_per_s"] / f32[key]
    peer_targets.add_peer_ratios(rows)


def markdown(report: dict) -> str:
    s = report["settings"]
    rounds = s["rounds"] > 1
    m = report["machine"]
    cpu = (f"CPU: {m['cpu']}, avx512_vnni {'yes' if m.get('avx512_vnni') else 'no'}, memory bandwidth "
           f"{m['memory_bandwidth_gbps']} GB/s (numpy copy). ") if m.get("cpu") else ""
    lines = [f"Greedy generation, {s['model']} {s['dtype']}, prompt {s['prompt_len']} tokens, "
             f"{s['new_tokens']} new tokens, median of {s['runs']} runs"
             + (f", {s['rounds']} rounds (targets taking turns; vs hf within each round)." if rounds else "."),
             "", cpu + f"Command: `python {report['command']}`", "",
             "| " + ("round | " if rounds else "") + "target | batch | tokens/s | runs (tokens/s) | vs hf "
             "| prefill ms | decode step ms | engine overhead ms | vs f32 | weight MB/step | decode GB/s | floor ms |",
             "|" + ("---:|" if rounds else "") + "---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        head = f"| {r['round'] + 1} " if rounds else ""
        if r["status"] != "ok":
            lines.append(f"{head}| {r['target']} | {r['batch_size']} | skipped: {r['reason']} | | | | | | | | | |")
            continue
        ratio = f"{r['vs_hf']:.2f}x" if "vs_hf" in r else "-"
        extra = " | ".join("-" if r.get(k) is None else f"{r[k]:.1f}"
                           for k in ("prefill_ms", "decode_step_ms", "engine_overhead_ms"))
        bw = " | ".join([f"{r['vs_float32']:.2f}x" if "vs_float32" in r else "-",
                         f"{r['weight_bytes'] / 1e6:.1f}" if r.get("weight_bytes") else "-",
                         f"{r['decode_bandwidth_gbps']:.1f}" if r.get("decode_bandwidth_gbps") else "-",
                         f"{r['floor_ms']:.2f}" if r.get("floor_ms") else "-"])
        label = r["target"] + (f" ({r['path']})" if r.get("path") else "")
        lines.append(f"{head}| {label} | {r['batch_size']} | {r['tokens_per_s']:.1f} | "
                     f"{', '.join(map(str, r['tokens_per_s_runs']))} | {ratio} | {extra} | {bw} |")
    if rounds:
        lines += ["", "Across rounds (median, and each round in order):", "",
                  "| target | batch | tokens/s | by round | vs hf | by round | vs f32 | by round |",
                  "|---|---:|---:|---|---:|---|---:|---|"]
        keys = dict.fromkeys((r["target"], r["batch_size"]) for r in report["rows"] if r["status"] == "ok")
        for target, batch in keys:
            by_round = {r["round"]: r for r in report["rows"]
                        if (r["target"], r["batch_size"]) == (target, batch) and r["status"] == "ok"}
            mine = [by_round.get(i) for i in range(s["rounds"])]  # None: skipped that round
            tps = [r["tokens_per_s"] for r in mine if r]
            cells = []
            for key in ("vs_hf", "vs_float32"):
                ratios = [r[key] for r in mine if r and key in r]
                cells.append((f"{statistics.median(ratios):.2f}x" if ratios else "-") + " | "
                             + ", ".join(f"{r[key]:.2f}x" if r and key in r else "-" for r in mine))
            lines.append(f"| {target} | {batch} | {statistics.median(tps):.1f} | "
                         + ", ".join(f"{r['tokens_per_s']:.1f}" if r else "-" for r in mine) + " | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + peer_targets.markdown(report)


if __name__ == "__main__":
    sys.exit(main())
