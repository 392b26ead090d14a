"""Parity of a TensorRT plan with ONNX Runtime (CPU) on the same ONNX graph.

Runs a left-padded prefill and one decode step through the TensorRT runner
(the same code `--backend tensorrt` uses) and through an ONNX Runtime CPU
session, and compares the logits of every real (non-padding) position.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# (max abs diff of logits, minimum top-1 agreement) by precision.
TOLERANCES = {"float32": (1e-2, 0.99), "float16": (1e-1, 0.9)}


@dataclass
class ParityRow:
    phase: str
    shape: str
    max_abs_diff: float
    top1: float
    atol: float
    min_top1: float

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.atol and self.top1 >= self.min_top1


def compare(name: str, shape: str, ref: np.ndarray, got: np.ndarray, atol: float, min_top1: float) -> ParityRow:
    """Logits [N, V] from the reference and the candidate, at the same positions."""
    diff = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)))) if ref.size else 0.0
    if not np.all(np.isfinite(got)):
        diff = float("nan")
    top1 = float(np.mean(ref.argmax(-1) == got.argmax(-1))) if ref.size else 1.0
    return ParityRow(name, shape, diff, top1, atol, min_top1)


def format_table(rows: list[ParityRow]) -> str:
    head = ("phase", "shape (batch x seq, past)", "max |diff| logits", "top-1 agree", "result")
    body = [(r.phase, r.shape, f"{r.max_abs_diff:.3g} (tol {r.atol:g})", f"{r.top1:.3f} (min {r.min_top1:g})",
             "ok" if r.passed else "FAIL") for r in rows]
    widths = [max(len(x[c]) for x in [head] + body) for c in range(5)]
    return "\n".join("  ".join(x[c].ljust(widths[c]) for c in range(5)).rstrip() for x in [head] + body)


def check_plan(plan: Path, onnx: Path, source, precision: str, device: str = "cuda",
               atol: float | None = None, min_top1: float | None = None) -> list[ParityRow]:
    """Prefill (batch 2, one row left-padded) and one decode step: TensorRT vs ONNX Runtime CPU."""
    import onnxruntime as ort

    from mini_engine.runner import RunnerConfig, StepInput
    from mini_engine_backends.tensorrt.runner import TensorRTRunner

    from .tensorrt_meta import read_metadata

    d_atol, d_top1 = TOLERANCES["float16" if precision == "float16" else "float32"]
    atol, min_top1 = d_atol if atol is None else atol, d_top1 if min_top1 is None else min_top1
    settings = read_metadata(plan)["settings"]
    cfg = source.config
    b, t = min(2, settings["max_batch"]), min(8, settings["max_seq"] - 1)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int64)
    mask = np.ones((b, t), dtype=np.int64)
    if b > 1 and t > 3:
        mask[1, :3] = 0  # a left-padded row
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)

    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    kv_inputs = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    past = {i.name: np.zeros((b, cfg.n_head, 0, cfg.head_dim), np.float16 if "float16" in i.type else np.float32)
            for i in kv_inputs}
    names = [o.name for o in sess.get_outputs()]
    ref = dict(zip(names, sess.run(None, {"input_ids": ids, "position_ids": pos, "attention_mask": mask, **past})))

    rows = []
    runner = TensorRTRunner(RunnerConfig(source, device, precision, {"plan": str(plan)}))
    with runner:
        runner.allocate_kv(b, t + 1)
        got = runner.execute(StepInput(ids, pos, mask, list(range(b)), 0, logits="all"))
        real = mask.astype(bool)
        rows.append(compare("context", f"{b}x{t}, 0", ref["logits"][real], got[real], atol, min_top1))
        new = rng.integers(0, cfg.vocab_size, (b, 1)).astype(np.int64)
        mask2 = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
        pos2 = pos[:, -1:] + 1
        feed = {"input_ids": new, "position_ids": pos2, "attention_mask": mask2}
        feed.update({n: ref[n.replace("past_key_values.", "present.")] for n in past})
        ref2 = sess.run(["logits"], feed)[0][:, -1]
        got2 = runner.execute(StepInput(new, pos2, mask2, list(range(b)), t))
        rows.append(compare("generation", f"{b}x1, {t}", ref2, got2, atol, min_top1))
    return rows
