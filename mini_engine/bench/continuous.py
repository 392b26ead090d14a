"""`bench --mode continuous`: naive vs static vs continuous batching on a mixed-length workload.

The workload is fixed so nobody tunes it (its parameters are flags, the defaults are it):
64 requests, seed 0, prompt lengths uniform in 16-256 tokens, output lengths uniform in 16-256
tokens with EOS ignored. Arrivals: `burst` (all at once) and `poisson` (at a rate that keeps
about max_num_seqs requests in flight: continuous batching's own burst throughput in req/s,
unless --request-rate is given). Static batching is today's batcher at each --batch-sizes
value (the best one is its figure); naive re-runs the whole sequence per token, one request at
a time, on a fixed seeded subset.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import MiniEngineError

COLUMNS: dict[str, tuple[str, str]] = {
    "target": ("", "backend:device"),
    "mode": ("", "naive (no KV cache, one at a time), static (today's batcher), continuous (scheduler + paged KV)"),
    "arrivals": ("", "burst (all submitted at once) or poisson R/s"),
    "batch_size": ("requests", "static: the batcher's max_batch_size; continuous: max_num_seqs"),
    "status": ("", "ok, skipped or failed"),
    "reason": ("", "why a target was skipped or failed"),
    "requests": ("requests", "requests in this point"),
    "tokens_generated": ("tokens", "generated tokens (EOS ignored)"),
    "padded_tokens": ("tokens", "prompt positions computed for padding (static: left padding to the batch's longest)"),
    "tokens_per_s": ("tokens/s", "generated tokens / wall time from the first submit to the last answer"),
    "ttft_mean_ms": ("ms", "submit -> first token"),
    "ttft_p95_ms": ("ms", ""),
    "itl_mean_ms": ("ms", "gap between consecutive tokens of a request"),
    "itl_p95_ms": ("ms", ""),
    "e2e_mean_ms": ("ms", "submit -> last token"),
    "e2e_p95_ms": ("ms", ""),
    "mean_rows_per_step": ("rows", "sequences per runner step (continuous) or per batch (static)"),
    "step_ms_mean": ("ms", "wall time per runner step"),
    "engine_overhead_pct": ("%", "wall time outside Runner.execute*: scheduler, block manager, sampling, detokenizer"),
    "peak_kv_mib": ("MiB", "continuous: peak KV blocks in use; static: peak KV slots allocated (rows x padded length)"),
    "peak_rss_mb": ("MiB", "peak resident memory of the target's process during the point"),
    "preemptions": ("", "sequences preempted and recomputed (continuous)"),
    "weight_bytes": ("bytes", "weights one step reads"),
}


@dataclass
class Workload:
    prompts: list[list[int]]
    outputs: list[int]

    @classmethod
    def make(cls, n: int, prompt_lens: tuple[int, int], output_lens: tuple[int, int], seed: int,
             vocab: int) -> "Workload":
        rng = np.random.default_rng(seed)
        plen = rng.integers(prompt_lens[0], prompt_lens[1] + 1, n)
        olen = rng.integers(output_lens[0], output_lens[1] + 1, n)
        # Token ids below 50000 are ordinary BPE pieces in GPT-2's vocabulary.
        prompts = [rng.integers(0, min(vocab, 50000), int(k)).tolist() for k in plen]
        return cls(prompts, [int(k) for k in olen])

    def subset(self, k: int, seed: int) -> "Workload":
        idx = np.random.default_rng(seed + 1).choice(len(self.prompts), size=min(k, len(self.prompts)), replace=False)
        return Workload([self.prompts[i] for i in sorted(idx)], [self.outputs[i] for i in sorted(idx)])


def run_points(spec, engine, emit: Callable[..., None], base: dict[str, Any]) -> None:
    """Every point of the comparison for one target, each emitted as a row when measured."""
    from ..sequence import Sequence
    from .metrics import PeakRSS

    wl = Workload.make(spec.requests, spec.prompt_lens, spec.output_lens, spec.seed,
                       engine.source.config.vocab_size)
    params = engine.sampling_params(ignore_eos=True, max_new_tokens=max(wl.outputs))
    bytes_per_token = engine.runner.kv_bytes_per_token

    def emit_row(mode: str, arrivals: str, bs: int | None, rec: dict[str, Any]) -> None:
        emit(event="row", row=base | {"mode": mode, "arrivals": arrivals, "batch_size": bs, "status": "ok",
                                      "reason": ""} | rec)
        emit(event="progress")

    _warm_up(engine, wl, params)
    # naive: one at a time, every token re-runs the whole sequence
    sub = wl.subset(spec.naive_requests, spec.seed)
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        recs = []
        steps0, run0 = engine.num_steps, engine.runner_s
        for i, (p, n) in enumerate(zip(sub.prompts, sub.outputs)):
            start = time.perf_counter()
            c = engine.generate_uncached(Sequence(i, "", p, max_new_tokens=n),
                                         engine.sampling_params(ignore_eos=True, max_new_tokens=n))
            recs.append(_record(c, start - t0, c.ttft_ms + (start - t0) * 1e3, t0))
        wall = time.perf_counter() - t0
    emit_row("naive", "burst", 1, _summary(recs, wall, engine.num_steps - steps0, engine.runner_s - run0,
                                           0, None, rss.peak_mb, 0, len(sub.prompts), steps_rows=len(sub.prompts) and 1))

    static_rows = []
    for bs in spec.batch_sizes:
        row = _served(engine, "static", wl, params, bs, None, bytes_per_token)
        static_rows.append(row)
        emit_row("static", "burst", bs, row)
    cont = None
    if engine.continuous:
        cont = _served(engine, "generate", wl, params, spec.max_num_seqs, None, bytes_per_token)
        emit_row("continuous", "burst", spec.max_num_seqs, cont)
    else:
        for arrivals in ("burst", "poisson"):
            emit(event="row", row=base | {"mode": "continuous", "arrivals": arrivals, "batch_size": spec.max_num_seqs,
                                          "status": "skipped", "reason": engine.static_reason})
            emit(event="progress")
    best = max(static_rows, key=lambda r: r["tokens_per_s"]) if static_rows else None
    rate = spec.request_rate or (cont or best)["tokens_per_s"] / float(np.mean(wl.outputs))
    label = f"poisson {rate:.2f}/s"
    if best is not None:
        bs = spec.batch_sizes[static_rows.index(best)]
        emit_row("static", label, bs, _served(engine, "static", wl, params, bs, rate, bytes_per_token))
    if engine.continuous:
        emit_row("continuous", label, spec.max_num_seqs,
                 _served(engine, "generate", wl, params, spec.max_num_seqs, rate, bytes_per_token))


def _warm_up(engine, wl: Workload, params) -> None:
    """Compile kernels and touch every path once (numba JIT, oneDNN primitives, ORT arenas)."""
    from ..sequence import Sequence

    short = [[(t + 7919) % 50000 for t in p[:16]] for p in wl.prompts[:4]]  # not the workload's prefixes
    engine.generate_batch([Sequence(i, "", p, max_new_tokens=4) for i, p in enumerate(short)], params)
    engine.generate_uncached(Sequence(0, "", short[0]), engine.sampling_params(ignore_eos=True, max_new_tokens=2))
    if engine.continuous:
        for i, p in enumerate(short):
            engine.add_request(f"warmup-{i}", p, engine.sampling_params(ignore_eos=True, max_new_tokens=4))
        while engine.has_unfinished_requests():
            engine.step()


def _served(engine, mode: str, wl: Workload, params, bs: int, rate: float | None, bytes_per_token: int) -> dict:
    """Serve the whole workload through BatchedEngine (burst, or Poisson at `rate`)."""
    import dataclasses

    from ..serving import BatchedEngine
    from .metrics import PeakRSS

    batching = dataclasses.replace(engine.config.batching, max_batch_size=bs, preferred_batch_sizes=[])
    rng = np.random.default_rng(17)
    gaps = rng.exponential(1.0 / rate, len(wl.prompts)) if rate else np.zeros(len(wl.prompts))
    if engine.continuous:
        engine.scheduler.block_manager.reset_prefix_cache()  # the same prompts ran in an earlier point
    stats0 = engine.stats()
    engine.peak_kv_usage = 0.0
    engine.peak_static_kv_tokens = 0
    done_at: dict[int, float] = {}
    with PeakRSS() as rss, BatchedEngine(engine, mode, batching, params=params) as server:
        t0 = time.perf_counter()
        futures = []
        at = t0
        for i, (p, n) in enumerate(zip(wl.prompts, wl.outputs)):
            at += gaps[i]
            time.sleep(max(0.0, at - time.perf_counter()))
            start = time.perf_counter()
            f = server.submit(p, max_new_tokens=n)
            f.add_done_callback(lambda _f, i=i: done_at.__setitem__(i, time.perf_counter()))
            futures.append((f, start))
        recs = []
        for i, (f, start) in enumerate(futures):
            c = f.result()
            ttft = c.ttft_ms if getattr(f, "ttft_from_submit", False) else f.queue_ms + c.ttft_ms
            recs.append(_record(c, start - t0, ttft, t0, end=done_at.get(i, time.perf_counter()) - start))
        wall = max(done_at.values()) - t0
        batches = server.stats()
    stats = engine.stats()
    steps = stats["steps"] - stats0["steps"]
    runner_s = stats["runner_s"] - stats0["runner_s"]
    if server.continuous:
        sc = engine.scheduler
        kv_mib = engine.peak_kv_usage * sc.block_manager.num_blocks * sc.config.block_size * bytes_per_token / 2**20
        rows = (stats["rows_stepped"] - stats0["rows_stepped"]) / max(steps, 1)
        pre = stats["preemptions"] - stats0["preemptions"]
    else:
        kv_mib = engine.peak_static_kv_tokens * bytes_per_token / 2**20
        rows = batches["mini_engine:mean_batch_size"]
        pre = 0
    return _summary(recs, wall, steps, runner_s, stats["padded_tokens"] - stats0["padded_tokens"], kv_mib,
                    rss.peak_mb, pre, len(wl.prompts), steps_rows=rows)


def _record(c, start_s: float, ttft_ms: float, t0: float, end: float | None = None) -> dict:
    times = c.token_times_ms
    return {"tokens": len(c.token_ids), "ttft_ms": ttft_ms, "gaps": [b - a for a, b in zip(times, times[1:])],
            "e2e_ms": (end * 1e3) if end is not None else c.total_ms + (ttft_ms - c.ttft_ms)}


def _summary(recs, wall, steps, runner_s, padded, kv_mib, rss_mb, preemptions, n, steps_rows) -> dict:
    if not recs:
        raise MiniEngineError("no request was answered")
    ttft = np.array([r["ttft_ms"] for r in recs])
    e2e = np.array([r["e2e_ms"] for r in recs])
    gaps = np.array([g for r in recs for g in r["gaps"]] or [0.0])
    tokens = sum(r["tokens"] for r in recs)
    return {
        "requests": n, "tokens_generated": tokens, "padded_tokens": int(padded),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_mean_ms": round(float(ttft.mean()), 1), "ttft_p95_ms": round(float(np.percentile(ttft, 95)), 1),
        "itl_mean_ms": round(float(gaps.mean()), 2), "itl_p95_ms": round(float(np.percentile(gaps, 95)), 2),
        "e2e_mean_ms": round(float(e2e.mean()), 1), "e2e_p95_ms": round(float(np.percentile(e2e, 95)), 1),
        "mean_rows_per_step": round(float(steps_rows), 2), "step_ms_mean": round(wall * 1e3 / max(steps, 1), 2),
        "engine_overhead_pct": round(100 * (1 - runner_s / wall), 2),
        "peak_kv_mib": None if kv_mib is None else round(kv_mib, 1), "peak_rss_mb": round(rss_mb, 1),
        "preemptions": preemptions,
    }


def comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target and arrivals: continuous vs the best static point and vs naive."""
    out = []
    ok = [r for r in rows if r["status"] == "ok"]
    for target in dict.fromkeys(r["target"] for r in ok):
        naive = next((r for r in ok if r["target"] == target and r["mode"] == "naive"), None)
        for arrivals in dict.fromkeys(r["arrivals"] for r in ok if r["target"] == target and r["mode"] != "naive"):
            pts = [r for r in ok if r["target"] == target and r["arrivals"] == arrivals]
            cont = next((r for r in pts if r["mode"] == "continuous"), None)
            static = [r for r in pts if r["mode"] == "static"]
            if cont is None or not static:
                continue
            best = max(static, key=lambda r: r["tokens_per_s"])
            out.append({"target": target, "arrivals": arrivals, "continuous_tokens_per_s": cont["tokens_per_s"],
                        "best_static_batch_size": best["batch_size"], "static_tokens_per_s": best["tokens_per_s"],
                        "vs_static": round(cont["tokens_per_s"] / best["tokens_per_s"], 2),
                        "naive_tokens_per_s": naive["tokens_per_s"] if naive else None,
                        "vs_naive": round(cont["tokens_per_s"] / naive["tokens_per_s"], 1) if naive else None,
                        "ttft_p95_ms_continuous": cont["ttft_p95_ms"], "ttft_p95_ms_static": best["ttft_p95_ms"]})
    return out


def print_report(result: dict[str, Any], echo) -> None:
    from .report import _echo_table

    rows = result["results"]
    head = ["target", "mode", "arrivals", "bs", "tokens", "padded", "tok/s", "TTFT mean", "p95", "ITL mean", "p95",
            "e2e mean", "p95", "rows/step", "step ms", "ovh %", "KV MiB", "RSS MB", "preempt"]
    table = [head]
    for r in rows:
        if r["status"] != "ok":
            continue
        table.append([r["target"], r["mode"], r["arrivals"], str(r["batch_size"]), str(r["tokens_generated"]),
                      str(r["padded_tokens"]), f"{r['tokens_per_s']:.1f}", f"{r['ttft_mean_ms']:.0f}",
                      f"{r['ttft_p95_ms']:.0f}", f"{r['itl_mean_ms']:.1f}", f"{r['itl_p95_ms']:.1f}",
                      f"{r['e2e_mean_ms']:.0f}", f"{r['e2e_p95_ms']:.0f}", f"{r['mean_rows_per_step']:.1f}",
                      f"{r['step_ms_mean']:.1f}", f"{r['engine_overhead_pct']:.1f}",
                      "-" if r["peak_kv_mib"] is None else f"{r['peak_kv_mib']:.0f}", f"{r['peak_rss_mb']:.0f}",
                      str(r["preemptions"])])
    _echo_table(table, echo)
    for r in rows:
        if r["status"] != "ok":
            echo(f"{r['status']}: {r['target']}: {r['reason']}")
    for c in result.get("comparison", []):
        echo(f"{c['target']} ({c['arrivals']}): continuous {c['continuous_tokens_per_s']:.1f} tok/s = "
             f"{c['vs_static']:.2f}x static at its best batch size {c['best_static_batch_size']} "
             f"({c['static_tokens_per_s']:.1f})" + (f", {c['vs_naive']:.1f}x naive ({c['naive_tokens_per_s']:.2f})"
                                                    if c["vs_naive"] else "")
             + f"; TTFT p95 {c['ttft_p95_ms_continuous']:.0f} vs {c['ttft_p95_ms_static']:.0f} ms")


def write_plots(rows: list[dict[str, Any]], out) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    labels = [f"{r['target']}\n{r['mode']} {r['batch_size']}\n{r['arrivals']}" for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, len(ok) * 1.1), 5))
    for ax, key, title in ((axes[0], "tokens_per_s", "generated tokens/s"), (axes[1], "ttft_p95_ms", "TTFT p95 (ms)")):
        ax.bar(range(len(ok)), [r[key] for r in ok],
               color=["tab:gray" if r["mode"] == "naive" else "tab:orange" if r["mode"] == "static" else "tab:blue"
                      for r in ok])
        ax.set_xticks(range(len(ok)), labels, fontsize=7)
        ax.set_title(title)
        ax.set_yscale("log" if key == "tokens_per_s" else "linear")
    fig.suptitle("naive (gray) vs static (orange) vs continuous batching (blue), mixed-length workload")
    fig.tight_layout()
    path = out / "continuous.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
