"""`mini-engine compare`: the same prompts through several backends, one process each.

A worker (`python -m mini_engine.compare`) runs greedy generation for every prompt
with one backend and saves, per prompt, the generated ids, the last-position logits
of every step, and per-step latencies. The parent compares every pair of backends on
the steps whose inputs were identical (up to and including the first divergent token),
so a logit difference always means the runtimes disagree, never that they were fed
different text.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

DEFAULT_PROMPTS = ("Hello, my name is", "The capital of France is", "In a shocking finding, scientists discovered",
                   "def fibonacci(n):")


@dataclass
class BackendRun:
    target: str
    available: bool
    reason: str | None = None
    tokens: list[list[int]] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)  # per prompt [steps, V]
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    load_s: float = 0.0

    def row(self) -> dict:
        d = {"backend": self.target, "available": self.available}
        if self.available:
            d.update(prefill_ms=round(self.prefill_ms, 3), decode_ms_per_token=round(self.decode_ms, 3),
                     load_s=round(self.load_s, 2))
        else:
            d["reason"] = self.reason
        return d


def parse_targets(text: str) -> list[tuple[str, str]]:
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, device = item.partition(":")
        out.append((name, device or "cpu"))
    if len(out) < 2:
        raise ConfigError(f"--backends needs at least two BACKEND[:DEVICE] entries, got '{text}'")
    if len(set(out)) != len(out):
        raise ConfigError(f"--backends lists a backend twice: '{text}'")
    return out


def read_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        lines = [line.rstrip("\n") for line in Path(path).read_text().splitlines()]
    except OSError as e:
        raise ConfigError(f"cannot read --prompts file '{path}': {e.strerror}") from None
    prompts = [p for p in lines if p.strip()]
    if not prompts:
        raise ConfigError(f"--prompts file '{path}' has no prompts (one per line)")
    return prompts


def run_backend(config: dict, name: str, device: str, prompts: list[str], max_new_tokens: int) -> BackendRun:
    """Run one backend in a fresh process so its thread pool has the machine to itself."""
    from .registry import get_backend

    target = f"{name}:{device}"
    try:
        avail = get_backend(name).availability()
    except Exception as e:  # unknown or broken plugin: report, keep comparing the others
        return BackendRun(target, False, str(e))
    if not avail.available:
        return BackendRun(target, False, avail.reason)
    if device.split(":")[0] not in avail.devices:
        return BackendRun(target, False, f"device '{device}' not available here (backend devices: "
                                         f"{', '.join(avail.devices) or 'none'})")
    from .config import options_for

    cfg = json.loads(json.dumps(config))
    backend = cfg["backend"]
    # The rule of generate and bench: this backend's own table, plus flat keys only when it is
    # the config's backend.name.
    backend.update(name=name, device=device, options=options_for(backend["options"], backend["name"], name))
    with tempfile.TemporaryDirectory(prefix="mini-engine-compare-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"config": cfg, "prompts": prompts, "max_new_tokens": max_new_tokens,
                                   "out": str(Path(tmp) / "result.npz")}))
        proc = subprocess.run([sys.executable, "-m", "mini_engine.compare", str(job)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            return BackendRun(target, False, lines[-1] if lines else f"worker exited with {proc.returncode}")
        data = np.load(Path(tmp) / "result.npz", allow_pickle=False)
        meta = json.loads(str(data["meta"]))
        return BackendRun(target, True, tokens=meta["tokens"],
                          logits=[data[f"logits{i}"] for i in range(len(prompts))],
                          prefill_ms=meta["prefill_ms"], decode_ms=meta["decode_ms"], load_s=meta["load_s"])


def compare_pair(a: BackendRun, b: BackendRun, atol: float) -> dict:
    max_diff, sums, count, agree, steps, identical, first = 0.0, 0.0, 0, 0, 0, 0, []
    for ta, tb, la, lb in zip(a.tokens, b.tokens, a.logits, b.logits):
        n = min(len(ta), len(tb))
        div = next((i for i in range(n) if ta[i] != tb[i]), None)
        identical += div is None and len(ta) == len(tb)
        first.append(div)
        upto = n if div is None else div + 1  # inputs were identical up to the divergent step
        d = np.abs(la[:upto].astype(np.float64) - lb[:upto])
        max_diff = max(max_diff, float(d.max(initial=0.0)))
        sums += float(d.sum())
        count += d.size
        agree += int((la[:upto].argmax(-1) == lb[:upto].argmax(-1)).sum())
        steps += upto
    return {"a": a.target, "b": b.target, "max_abs_diff": max_diff, "mean_abs_diff": sums / max(count, 1),
            "top1_agreement": agree / max(steps, 1), "prompts_identical": identical, "prompts": len(a.tokens),
            "first_divergence": first, "passed": max_diff <= atol}


def compare_all(runs: list[BackendRun], atol: float) -> list[dict]:
    ok = [r for r in runs if r.available]
    return [compare_pair(a, b, atol) for a, b in itertools.combinations(ok, 2)]


def to_json(runs: list[BackendRun], pairs: list[dict], atol: float) -> dict[str, Any]:
    return {"atol": atol, "backends": [r.row() for r in runs], "pairs": pairs,
            "passed": all(p["passed"] for p in pairs)}


# ----- worker (one backend, its own process) -------------------------------------
def _worker(job_path: str) -> None:
    import time

    from .config import load_config
    from .engine import Engine
    from .sequence import Sequence

    job = json.loads(Path(job_path).read_text())
    t0 = time.perf_counter()
    engine = Engine(config=load_config(job["config"]))
    load_s = time.perf_counter() - t0
    runner = engine.runner
    timings: list[float] = []  # seconds per runner step that returned logits
    recorded: list[np.ndarray] = []
    # The engine's generation path: continuous batching (execute_paged) or static (execute).
    name = "execute_paged" if engine.continuous else "execute"
    real_execute = getattr(runner, name)

    def execute(step):
        start = time.perf_counter()
        out = real_execute(step)
        if len(out):  # a prefill chunk that does not end the prompt returns no logits
            timings.append(time.perf_counter() - start)
            recorded.append(np.array(out[0], dtype=np.float32))
        return out

    params = engine.sampling_params(max_new_tokens=job["max_new_tokens"], temperature=0.0, ignore_eos=True)
    with engine:
        engine.generate(job["prompts"][0], params)  # warm-up: lazy init, allocator growth
        timings.clear()
        # Wrap this instance's step method: the engine's own loop runs unchanged, we only observe it.
        setattr(runner, name, execute)
        tokens, logits = [], []
        prefill, decode = [], []
        for i, prompt in enumerate(job["prompts"]):
            recorded.clear()
            start = len(timings)
            if engine.continuous:
                engine.scheduler.block_manager.reset_prefix_cache()  # every prompt's prefill is computed
                c = engine.generate(prompt, params)[0]
            else:
                c = engine.generate_batch([Sequence(i, prompt, engine.encode_prompt(prompt, params))], params)[0]
            tokens.append(c.token_ids)
            logits.append(np.stack(recorded))
            steps = timings[start:]
            prefill.append(steps[0])
            decode.extend(steps[1:])
    meta = {"tokens": tokens, "prefill_ms": 1e3 * float(np.median(prefill)),
            "decode_ms": 1e3 * float(np.median(decode)) if decode else 0.0, "load_s": load_s}
    np.savez(job["out"], meta=json.dumps(meta), **{f"logits{i}": x for i, x in enumerate(logits)})


def main(argv: list[str] | None = None) -> int:
    from .errors import MiniEngineError

    argv = sys.argv[1:] if argv is None else argv
    try:
        _worker(argv[0])
    except MiniEngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        print(f"internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

