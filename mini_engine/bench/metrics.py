"""Benchmark figures: per-trial summaries, mean and spread over trials, the machine's facts.

COLUMNS is the documented schema of every result row (CSV and JSON), with units.
"""
from __future__ import annotations

import os
import platform
import threading
import time
from typing import Any

import numpy as np

from ..devices import cuda_device_count, package_version
from ..errors import MiniEngineError
from .workload import Run

# name -> (unit, meaning). The order is the CSV's column order.
COLUMNS: dict[str, tuple[str, str]] = {
    "target": ("", "backend:device"),
    "backend": ("", "backend name"),
    "device": ("", "cpu, cuda, cuda:N"),
    "mode": ("", "forward (score a prompt), generate (KV cache + dynamic batching), naive (no KV cache, one at a time)"),
    "batch_size": ("requests", "the batcher's max_batch_size for this point"),
    "status": ("", "ok, skipped (cannot run here) or failed (error while running)"),
    "reason": ("", "why a target was skipped or failed"),
    "load": ("", "closed loop with N clients, or open loop at R req/s"),
    "trials": ("", "measured repetitions averaged in this row"),
    "requests": ("requests", "requests per trial"),
    "prompt_len": ("tokens", "tokens per prompt"),
    "max_new_tokens": ("tokens", "tokens generated per request (generate, naive)"),
    "throughput_rps": ("requests/s", "answered requests / wall time, mean over trials"),
    "throughput_rps_std": ("requests/s", "standard deviation over trials"),
    "tokens_per_s": ("tokens/s", "forward: prompt tokens scored/s; generate: tokens generated/s"),
    "tokens_per_s_std": ("tokens/s", "standard deviation over trials"),
    "latency_mean_ms": ("ms", "submit -> answer, queueing included"),
    "latency_mean_ms_std": ("ms", "standard deviation over trials"),
    "latency_p50_ms": ("ms", "median latency"),
    "latency_p90_ms": ("ms", ""),
    "latency_p95_ms": ("ms", ""),
    "latency_p95_ms_std": ("ms", "standard deviation over trials"),
    "latency_p99_ms": ("ms", ""),
    "queue_ms_mean": ("ms", "time waiting in the batcher's queue"),
    "compute_ms_mean": ("ms", "time from the batch's start to the answer"),
    "mean_batch_size": ("requests", "achieved: requests run / batches run"),
    "batches": ("", "batches run per trial"),
    "rejected": ("requests", "refused by a full queue, per trial"),
    "failed": ("requests", "answered with an error (timeouts included), per trial"),
    "ttft_mean_ms": ("ms", "time to first token from submit (generate)"),
    "ttft_p95_ms": ("ms", ""),
    "itl_mean_ms": ("ms", "inter-token latency: gap between consecutive tokens of a request (generate)"),
    "itl_p95_ms": ("ms", ""),
    "tpot_mean_ms": ("ms", "time per output token after the first, per request (generate)"),
    "steps_per_s": ("steps/s", "runner steps (forward passes) per second"),
    "bandwidth_gbps": ("GB/s", "weight bytes x steps/s: weight-streaming rate achieved"),
    "machine_bandwidth_gbps": ("GB/s", "measured memory copy bandwidth of this machine (read+write)"),
    "bandwidth_fraction": ("", "bandwidth_gbps / machine_bandwidth_gbps"),
    "peak_rss_mb": ("MiB", "peak resident memory of the target's process during the point"),
    "cuda_peak_mb": ("MiB", "peak CUDA memory allocated by torch during the point (torch:cuda only)"),
    "threads": ("", "intra-op threads the backend reports"),
    "load_s": ("s", "time to construct and load the engine for this target"),
    "model": ("", "model spec"),
    "dtype": ("", "weight dtype (precision run: float32, float16, bfloat16, int8, int4)"),
    "quantization": ("", "int8/int4: how the weights were quantized (method, scales, block size, lm_head)"),
    "weight_bytes": ("bytes", "bytes of weights one step reads at that precision (quantized weights and scales)"),
}

# Metrics averaged over trials; those in SPREAD also get a `_std` column.
_AVERAGED = ("throughput_rps", "tokens_per_s", "latency_mean_ms", "latency_p50_ms", "latency_p90_ms",
             "latency_p95_ms", "latency_p99_ms", "queue_ms_mean", "compute_ms_mean", "mean_batch_size",
             "batches", "rejected", "failed", "ttft_mean_ms", "ttft_p95_ms", "itl_mean_ms", "itl_p95_ms",
             "tpot_mean_ms", "steps_per_s", "bandwidth_gbps")
SPREAD = ("throughput_rps", "tokens_per_s", "latency_mean_ms", "latency_p95_ms")


def summarize(run: Run, batcher_stats: dict[str, Any], steps: int, weight_bytes: int) -> dict[str, float]:
    """One trial's figures."""
    if not run.records:
        raise MiniEngineError("no request succeeded" + (f": {run.errors[0]}" if run.errors else ""))
    elapsed = max(run.elapsed_s, 1e-9)
    lat = np.array([r.latency_ms for r in run.records])
    p50, p90, p95, p99 = np.percentile(lat, [50, 90, 95, 99])
    out = {
        "throughput_rps": len(run.records) / elapsed,
        "tokens_per_s": sum(r.tokens for r in run.records) / elapsed,
        "latency_mean_ms": float(lat.mean()), "latency_p50_ms": p50, "latency_p90_ms": p90,
        "latency_p95_ms": p95, "latency_p99_ms": p99,
        "queue_ms_mean": float(np.mean([r.queue_ms for r in run.records])),
        "compute_ms_mean": float(np.mean([r.compute_ms for r in run.records])),
        "mean_batch_size": batcher_stats["mini_engine:mean_batch_size"],
        "batches": batcher_stats["mini_engine:num_batches_total"],
        "rejected": run.rejected, "failed": run.failed,
        "steps_per_s": steps / elapsed,
        "bandwidth_gbps": weight_bytes * steps / elapsed / 1e9,
    }
    ttft = [r.ttft_ms for r in run.records if r.ttft_ms is not None]
    if ttft:
        gaps = [g for r in run.records for g in r.token_gaps_ms]
        tpot = [float(np.mean(r.token_gaps_ms)) for r in run.records if r.token_gaps_ms]
        out.update(ttft_mean_ms=float(np.mean(ttft)), ttft_p95_ms=float(np.percentile(ttft, 95)),
                   itl_mean_ms=float(np.mean(gaps)) if gaps else None,
                   itl_p95_ms=float(np.percentile(gaps, 95)) if gaps else None,
                   tpot_mean_ms=float(np.mean(tpot)) if tpot else None)
    return {k: float(v) if v is not None else None for k, v in out.items()}


def aggregate(trials: list[dict[str, float]]) -> dict[str, float]:
    """Mean over trials of every metric, plus the standard deviation of the SPREAD ones."""
    out: dict[str, float] = {}
    for key in _AVERAGED:
        values = [t[key] for t in trials if t.get(key) is not None]
        if not values:
            continue
        out[key] = round(float(np.mean(values)), 3)
        if key in SPREAD:
            out[f"{key}_std"] = round(float(np.std(values, ddof=1)), 3) if len(values) > 1 else None
    return out


class PeakRSS:
    """Samples this process's resident memory in the background; `peak_mb` is the maximum seen."""

    def __init__(self, interval_s: float = 0.02):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def memory_bandwidth_gbps(mib: int = 128, repeats: int = 5) -> float:
    """Best-of-N numpy copy of a buffer far larger than the caches; counts read + write bytes."""
    src = np.ones(mib * 2**20 // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return round(2 * src.nbytes / best / 1e9, 2)


def machine_info() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    libs = {name: package_version(*dists) for name, dists in {
        "mini-engine": ("mini-engine",), "torch": ("torch",), "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
        "onnx": ("onnx",), "tensorrt": ("tensorrt",), "numpy": ("numpy",), "transformers": ("transformers",)}.items()}
    return {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "cuda_devices": cuda_device_count(),
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "libraries": {k: v for k, v in libs.items() if v},
    }
