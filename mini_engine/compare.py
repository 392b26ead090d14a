"""`mini-engine compare`: the same prompts through several backends, one process each.

A worker (`python -m mini_engine.compare`) runs greedy generation for every prompt
with one backend and saves, per prompt, the generated ids, the last-position logits
of every step, and per-step latencies. The parent compares every pair of backends on
the steps whose inputs were identical (up to and including the first divergent token),
so a logit difference always means the runtimes disagree, never that they were fed
different text.

Targets are BACKEND[:DEVICE][@DTYPE], so precision variants compare like backends
(`torch:cpu@float32,onnxruntime:cpu@int8`). Every worker also scores a fixed text
teacher-forced (one token a step through the runner's static path: the same weights and
quantization as generation): next-token distributions at identical inputs give the KL
divergence against the reference target (the first float32 one), and, for a real
checkpoint, each target's perplexity. Seeded random weights make perplexity meaningless
(near-uniform distributions: ~vocab size), so it is not reported for them.
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
# The fixed text every target scores teacher-forced (KL, perplexity): plain encyclopedic English.
DEFAULT_TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
                "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
                "Locally nicknamed the Iron Lady, it was constructed as the centrepiece of the 1889 World's Fair, and "
                "to crown the centennial anniversary of the French Revolution. Although initially criticised by some "
                "of France's leading artists and intellectuals for its design, it has since become a global cultural "
                "icon of France and one of the most recognisable structures in the world.")
QUANTIZED = ("int8", "int4")


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
    dtype: str = "float32"  # the precision the runner ran (its describe()), e.g. int8
    text_logits: np.ndarray | None = None  # [T-1, V]: the fixed text's next-token logits, teacher-forced
    text_ids: list[int] = field(default_factory=list)
    describe: dict = field(default_factory=dict)

    def row(self) -> dict:
        d = {"backend": self.target, "available": self.available}
        if self.available:
            d.update(dtype=self.dtype, prefill_ms=round(self.prefill_ms, 3),
                     decode_ms_per_token=round(self.decode_ms, 3), load_s=round(self.load_s, 2))
            q = self.describe.get("quantization")
            if q:
                d["quantization"] = q
        else:
            d["reason"] = self.reason
        return d


@dataclass(frozen=True)
class CompareTarget:
    name: str
    device: str = "cpu"
    dtype: str | None = None  # None = the config's model.dtype

    @property
    def label(self) -> str:
        return f"{self.name}:{self.device}" + (f"@{self.dtype}" if self.dtype else "")


def parse_targets(text: str) -> list[CompareTarget]:
    """BACKEND[:DEVICE][@DTYPE], comma-separated, e.g. torch:cpu@float32,onnxruntime:cpu@int8."""
    from .config import DTYPES

    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        head, _, dtype = item.partition("@")
        name, _, device = head.partition(":")
        if dtype and dtype not in DTYPES:
            raise ConfigError(f"target '{item}': precision '@{dtype}' must be one of {', '.join(DTYPES)}")
        out.append(CompareTarget(name, device or "cpu", dtype or None))
    if len(out) < 2:
        raise ConfigError(f"--targets needs at least two BACKEND[:DEVICE][@DTYPE] entries, got '{text}'")
    if len(set(out)) != len(out):
        raise ConfigError(f"--targets lists a backend twice: '{text}'")
    return out


def read_text(path: str | None) -> str:
    if path is None:
        return DEFAULT_TEXT
    try:
        text = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"cannot read --text file '{path}': {e.strerror}") from None
    if not text:
        raise ConfigError(f"--text file '{path}' is empty")
    return text


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


def run_backend(config: dict, name: str, device: str, prompts: list[str], max_new_tokens: int,
                dtype: str | None = None, text: str | None = None) -> BackendRun:
    """Run one backend in a fresh process so its thread pool has the machine to itself.

    `dtype`: the target's precision (None: the config's model.dtype). `text`: a fixed text to
    score teacher-forced (None: skip)."""
    from .registry import get_backend

    target = f"{name}:{device}" + (f"@{dtype}" if dtype else "")
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
    if dtype:
        cfg["model"]["dtype"] = dtype
    with tempfile.TemporaryDirectory(prefix="mini-engine-compare-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"config": cfg, "prompts": prompts, "max_new_tokens": max_new_tokens,
                                   "text": text, "out": str(Path(tmp) / "result.npz")}))
        proc = subprocess.run([sys.executable, "-m", "mini_engine.compare", str(job)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            return BackendRun(target, False, lines[-1] if lines else f"worker exited with {proc.returncode}")
        data = np.load(Path(tmp) / "result.npz", allow_pickle=False)
        meta = json.loads(str(data["meta"]))
        return BackendRun(target, True, tokens=meta["tokens"],
                          logits=[data[f"logits{i}"] for i in range(len(prompts))],
                          prefill_ms=meta["prefill_ms"], decode_ms=meta["decode_ms"], load_s=meta["load_s"],
                          dtype=meta.get("dtype", "float32"), describe=meta.get("describe", {}),
                          text_logits=data["text_logits"] if "text_logits" in data.files else None,
                          text_ids=meta.get("text_ids", []))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(run: BackendRun) -> float | None:
    """exp(mean NLL) of the fixed text under `run`'s next-token distributions."""
    if run.text_logits is None or len(run.text_ids) < 2:
        return None
    lp = _log_softmax(run.text_logits)
    nll = -lp[np.arange(len(lp)), np.asarray(run.text_ids[1:len(lp) + 1])]
    return float(np.exp(nll.mean()))


def text_stats(a: BackendRun, b: BackendRun) -> dict | None:
    """The fixed text, teacher-forced: KL(a || b) of next-token distributions at identical inputs,
    top-1 agreement and the relative logit error (onnx_quantize.logit_stats' definition)."""
    if a.text_logits is None or b.text_logits is None or a.text_ids != b.text_ids:
        return None
    la, lb = a.text_logits.astype(np.float64), b.text_logits.astype(np.float64)
    pa, pb = _log_softmax(la), _log_softmax(lb)
    kl = (np.exp(pa) * (pa - pb)).sum(-1)
    spread = la - la.mean(-1, keepdims=True)
    rel = float(np.sqrt(((la - lb) ** 2).mean()) / max(np.sqrt((spread ** 2).mean()), 1e-12))
    return {"positions": int(len(la)), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).mean()), "rel_logit_error": rel,
            "max_abs_diff": float(np.abs(la - lb).max())}


def _quantized(run: BackendRun) -> str | None:
    """The lower of a pair's precisions when quantized (int4 below int8), else None."""
    return run.dtype if run.dtype in QUANTIZED else None


def compare_pair(a: BackendRun, b: BackendRun, atol: float) -> dict:
    """a is the reference. Generation: steps up to and including the first divergence (identical
    inputs); `top1_per_step[i]`: share of prompts whose step i agrees, over prompts that reached it
    with identical inputs."""
    max_diff, sums, count, agree, steps, identical, first = 0.0, 0.0, 0, 0, 0, 0, []
    per_step: dict[int, list[bool]] = {}
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
        same = la[:upto].argmax(-1) == lb[:upto].argmax(-1)
        agree += int(same.sum())
        steps += upto
        for i, ok in enumerate(same.tolist()):
            per_step.setdefault(i, []).append(ok)
    tokens_same = sum(sum(x == y for x, y in zip(ta, tb)) for ta, tb in zip(a.tokens, b.tokens))
    tokens_all = sum(max(len(ta), len(tb)) for ta, tb in zip(a.tokens, b.tokens))
    out = {"a": a.target, "b": b.target, "max_abs_diff": max_diff, "mean_abs_diff": sums / max(count, 1),
           "top1_agreement": agree / max(steps, 1), "prompts_identical": identical, "prompts": len(a.tokens),
           "first_divergence": first, "token_agreement": tokens_same / max(tokens_all, 1),
           "top1_per_step": [float(np.mean(per_step[i])) for i in sorted(per_step)],
           "text": text_stats(a, b)}
    low = min((p for p in (_quantized(a), _quantized(b)) if p), key=lambda p: p == "int8", default=None)
    if low is None:
        out.update(passed=max_diff <= atol, criterion=f"max |dlogit| <= atol {atol:g}")
    else:
        # A quantized pair differs by quantization error, never within a float atol: it fails
        # when the graph is wrong, by the limits export validation applies (onnx_quantize.LIMITS).
        from mini_engine_export.onnx_quantize import LIMITS

        limit = LIMITS[low]["rel_err"]
        rel = (out["text"] or {}).get("rel_logit_error")
        out.update(passed=rel is not None and rel <= limit,
                   criterion=f"{low}: relative logit error on the fixed text <= {limit:g}")
    return out


def reference_index(runs: list[BackendRun]) -> int | None:
    """The reference target: the first available float32 one, else the first available."""
    ok = [i for i, r in enumerate(runs) if r.available]
    return next((i for i in ok if runs[i].dtype == "float32"), ok[0] if ok else None)


def compare_all(runs: list[BackendRun], atol: float) -> list[dict]:
    """Every pair, the reference target first in each pair it is in."""
    ok = [r for r in runs if r.available]
    ref = reference_index(runs)
    if ref is not None:
        ok.remove(runs[ref])
        ok.insert(0, runs[ref])
    return [compare_pair(a, b, atol) for a, b in itertools.combinations(ok, 2)]


def to_json(runs: list[BackendRun], pairs: list[dict], atol: float, real_weights: bool = False) -> dict[str, Any]:
    ref = reference_index(runs)
    rows = [r.row() for r in runs]
    for r, row in zip(runs, rows):
        if r.available:
            row["perplexity"] = perplexity(r) if real_weights else None
    note = None if real_weights else ("seeded random weights: perplexity is meaningless (near-uniform next-token "
                                      "distributions), not reported")
    base = runs[ref] if ref is not None else None
    ppl = rows[ref].get("perplexity") if ref is not None else None
    if ppl is not None and base.text_logits is not None and ppl > base.text_logits.shape[-1] / 4:
        note = (f"perplexity {ppl:.0f} is of the order of the vocabulary ({base.text_logits.shape[-1]}): these "
                f"weights predict like random ones, so perplexity says nothing here")
    return {"atol": atol, "reference": base.target if base is not None else None, "backends": rows,
            "pairs": pairs, "passed": all(p["passed"] for p in pairs), "perplexity_note": note}


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
        setattr(runner, name, real_execute)
        arrays = {f"logits{i}": x for i, x in enumerate(logits)}
        text_ids = []
        if job.get("text"):
            text_ids = engine.tokenizer.encode(job["text"])[:engine.max_positions]
            arrays["text_logits"] = score_text(runner, text_ids)
        info = runner.describe()
    meta = {"tokens": tokens, "prefill_ms": 1e3 * float(np.median(prefill)),
            "decode_ms": 1e3 * float(np.median(decode)) if decode else 0.0, "load_s": load_s,
            "dtype": info.get("dtype", engine.config.model.dtype), "text_ids": text_ids,
            "describe": json.loads(json.dumps(info, default=str))}
    np.savez(job["out"], meta=json.dumps(meta), **arrays)


def score_text(runner, ids: list[int]) -> np.ndarray:
    """Teacher-forced next-token logits [len(ids) - 1, V] through the runner's static path, one
    token a step with the KV cache (every backend's static contract, last-position logits)."""
    from .runner import StepInput

    runner.allocate_kv(1, len(ids))
    out = []
    try:
        for t in range(len(ids) - 1):
            step = StepInput(np.array([[ids[t]]], np.int64), np.array([[t]], np.int64),
                             np.ones((1, t + 1), np.int64), slot_ids=[0], past_len=t)
            out.append(np.asarray(runner.execute(step)[0], np.float32))
    finally:
        runner.free_kv()
    return np.stack(out)


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

