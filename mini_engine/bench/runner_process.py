"""One benchmark target in its own process: `python -m mini_engine.bench.runner_process`.

Each target runs alone in a fresh process because on a small CPU the thread pools
of different runtimes (torch's OpenMP, ONNX Runtime's spinning intra-op threads)
slow each other down when they share a process, and because a crashing backend
must not take the whole run with it.

Protocol: the spec (BenchTask JSON) arrives on stdin; JSON lines go to the
original stdout: {"event": "progress"}, {"event": "row", "row": {...}},
{"event": "info", "info": {...}}, {"event": "error", "reason": "..."}. Everything
libraries print goes to stderr, which the parent keeps as the target's log.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

from ..config import BatchingConfig, load_config
from ..errors import MiniEngineError
from . import metrics, workload
from .spec import BenchSpec, Target


def _quantization(describe: dict) -> str | None:
    """One line for a quantized runner's method (describe()["quantization"]), None otherwise."""
    q = describe.get("quantization")
    if not q:
        return None
    return q.get("description") or q.get("method") if isinstance(q, dict) else str(q)


def run_target(spec: BenchSpec, target: Target, emit: Callable[..., None]) -> None:
    from ..engine import Engine

    cfg = load_config(spec.target_config(target))
    t = time.perf_counter()
    engine = Engine(config=cfg)
    load_s = time.perf_counter() - t
    describe = engine.runner.describe()
    emit(event="info", info={"runner": describe, "load_s": round(load_s, 2)})
    base = {
        "target": target.spec, "backend": target.backend, "device": target.device, "status": "ok",
        "reason": "", "load": spec.load, "trials": spec.trials, "requests": spec.requests,
        "prompt_len": spec.prompt_len, "max_new_tokens": spec.max_new_tokens if spec.generates else None,
        "threads": _threads(describe), "load_s": round(load_s, 2),
        # The precision run (an explicit export's manifest may set it) and, for int8/int4, how it was
        # quantized; weight_bytes is what one step reads at that precision (bandwidth stays honest).
        "model": cfg.model.source, "dtype": describe.get("dtype", cfg.model.dtype),
        "quantization": _quantization(describe), "weight_bytes": engine.runner.weight_bytes,
    }
    if spec.mode == "continuous":
        from . import continuous

        base |= {"generation": engine.describe()["generation"]["mode"]}
        for k in ("prompt_len", "max_new_tokens", "load", "trials"):
            base.pop(k, None)
        with engine:
            continuous.run_points(spec, engine, emit, base)
        return
    prompts = workload.make_prompts(max(spec.requests, 64), spec.prompt_len, spec.seed, engine.tokenizer)
    params = engine.sampling_params(max_new_tokens=spec.max_new_tokens, ignore_eos=True)
    points = [("forward" if spec.mode == "forward" else "generate", bs) for bs in spec.batch_sizes]
    if spec.mode == "naive-vs-optimized":
        points.append(("naive", 1))
    with engine:
        for mode, bs in points:
            batching = dataclasses.replace(
                cfg.batching, max_batch_size=bs,
                preferred_batch_sizes=[p for p in cfg.batching.preferred_batch_sizes if p <= bs])
            row = _measure_point(spec, engine, mode, batching, params, prompts, emit)
            emit(event="row", row=base | {"mode": mode, "batch_size": bs} | row)


def _measure_point(spec: BenchSpec, engine, mode: str, batching: BatchingConfig, params, prompts,
                   emit) -> dict[str, Any]:
    from ..serving import BatchedEngine

    to_record = workload.forward_record if mode == "forward" else workload.generate_record

    def trial(n: int) -> tuple[workload.Run, dict[str, Any]]:
        with BatchedEngine(engine, mode, batching, params=params, top_k=spec.top_k) as server:
            def submit(i: int):
                return server.submit(prompts[i % len(prompts)])

            if spec.request_rate is not None:
                run = workload.open_loop(submit, to_record, n, spec.request_rate, spec.seed)
            else:
                run = workload.closed_loop(submit, to_record, n, spec.concurrency)
            return run, server.stats()

    warmup = spec.warmup if spec.warmup is not None else (1 if mode == "naive" else batching.max_batch_size)
    if warmup:
        trial(warmup)
    trials, peak_rss, cuda_peak = [], 0.0, None
    torch_cuda = _torch_cuda(engine)
    if torch_cuda:
        torch_cuda.reset_peak_memory_stats()
    for _ in range(spec.trials):
        steps0 = engine.num_steps
        with metrics.PeakRSS() as rss:
            run, stats = trial(spec.requests)
        peak_rss = max(peak_rss, rss.peak_mb)
        trials.append(metrics.summarize(run, stats, engine.num_steps - steps0, engine.runner.weight_bytes))
        emit(event="progress")
    if torch_cuda:
        cuda_peak = round(torch_cuda.max_memory_allocated() / 2**20, 1)
    return metrics.aggregate(trials) | {"peak_rss_mb": peak_rss, "cuda_peak_mb": cuda_peak}


def _threads(describe: dict[str, Any]) -> Any:
    """The intra-op thread count a runner reports (its option when it reports none; 0 = its default)."""
    for where in (describe, describe.get("options") or {}):
        for key in ("threads", "intra_op_threads"):
            if where.get(key) is not None:
                return where[key] or "default"
    return None


def _torch_cuda(engine):
    """torch.cuda when this target runs torch on a GPU (memory figures), else None."""
    if not engine.config.backend.device.startswith("cuda") or "torch" not in sys.modules:
        return None
    torch = sys.modules["torch"]
    return torch.cuda if torch.cuda.is_available() else None


def main() -> int:
    # Keep the protocol on a private copy of stdout; anything a library prints lands on stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def emit(**event: Any) -> None:
        proto.write(json.dumps(event, default=str) + "\n")

    try:
        task = json.loads(sys.stdin.read())
        spec = BenchSpec.from_dict(task["spec"])
        run_target(spec, Target(**task["target"]), emit)
    except MiniEngineError as e:
        emit(event="error", reason=str(e))
    except Exception as e:  # noqa: BLE001 - reported as this target's failure, the run goes on
        import traceback

        traceback.print_exc()
        emit(event="error", reason=f"internal error: {type(e).__name__}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
