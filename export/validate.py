"""Check an exported graph against the PyTorch forward it came from.

Cases cover what silently breaks exports: prefill with zero-length past, decode
with a real past, several batch sizes, and left-padded rows (padding in the past
and in the new tokens, positions counting real tokens only). The past fed to both
sides is the PyTorch forward's own present over a prefix, so the cache contract
is checked end to end.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import manifest as mf

# (batch, new tokens, past length, left-padded rows)
CASES = ((1, 7, 0, False), (1, 1, 7, False), (3, 6, 0, True), (3, 1, 9, True), (4, 3, 5, True), (8, 1, 4, False))
# Tolerances relative to the logits' scale: max |diff| <= TOL * max(1, max |logits|).
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}


@dataclass
class CaseResult:
    batch: int
    seq: int
    past: int
    padded: bool
    logits_diff: float
    kv_diff: float
    top1: float
    tol: float

    @property
    def passed(self) -> bool:
        return self.logits_diff <= self.tol and self.top1 >= 0.99


@dataclass
class Report:
    precision: str
    provider: str
    cases: list[CaseResult] = field(default_factory=list)
    skipped: str | None = None

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases)

    def failure(self) -> str:
        bad = [c for c in self.cases if not c.passed]
        c = max(bad, key=lambda c: c.logits_diff / c.tol)
        return (f"batch {c.batch} seq {c.seq} past {c.past}: max |logits diff| {c.logits_diff:.2e} > {c.tol:.1e} "
                f"or top-1 agreement {c.top1:.1%} < 99%")

    def table(self) -> str:
        if self.skipped:
            return f"validation skipped: {self.skipped}"
        rows = [("batch", "seq", "past", "padded", "max|dlogits|", "max|dKV|", "top-1", "tolerance", "result")]
        for c in self.cases:
            rows.append((str(c.batch), str(c.seq), str(c.past), "yes" if c.padded else "no", f"{c.logits_diff:.2e}",
                         f"{c.kv_diff:.2e}", f"{c.top1:.1%}", f"{c.tol:.1e}", "pass" if c.passed else "FAIL"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"validation vs the PyTorch forward ({self.precision}, {self.provider}):"]
        lines += ["  " + "  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
        lines.append("validation " + ("passed" if self.passed else "FAILED"))
        return "\n".join(lines)

    def summary(self) -> dict:
        if self.skipped:
            return {"skipped": self.skipped}
        worst = max((c.logits_diff for c in self.cases), default=0.0)
        return {"passed": self.passed, "provider": self.provider, "cases": len(self.cases),
                "max_logits_diff": worst, "min_top1": min((c.top1 for c in self.cases), default=1.0)}


def _case_inputs(cfg, batch: int, seq: int, past: int, padded: bool, rng):
    total = past + seq
    ids = rng.integers(0, cfg.vocab_size, (batch, total), dtype=np.int64)
    mask = np.ones((batch, total), dtype=np.int64)
    if padded:
        for row in range(1, batch):  # row 0 stays full length, like the longest prompt of a batch
            mask[row, : min(2 * row, total - 1)] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    return ids, pos, mask


def validate_export(path: Path, model, cfg, precision: str, providers: list[str] | None = None) -> Report:
    """Run every case through ONNX Runtime and the PyTorch `model` (float32); compare."""
    import onnxruntime as ort
    import torch

    available = ort.get_available_providers()
    if providers is None:
        providers = ["CPUExecutionProvider"]
        if precision == "float16":
            if "CUDAExecutionProvider" not in available:
                return Report(precision, "-", skipped="float16 graphs are validated on CUDAExecutionProvider, "
                                                      "which this onnxruntime does not have")
            providers = ["CUDAExecutionProvider"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=providers)
    kv_dtype = np.float16 if precision == "float16" else np.float32
    report = Report(precision, providers[0])
    rng = np.random.default_rng(0)
    names = mf.input_names(cfg.n_layer)
    for batch, seq, past, padded in CASES:
        if past + seq > cfg.n_positions:
            continue
        ids, pos, mask = _case_inputs(cfg, batch, seq, past, padded, rng)
        with torch.no_grad():
            t = torch.from_numpy
            pkv = None
            if past:
                _, pkv = model(t(ids[:, :past]), t(pos[:, :past]), t(mask[:, :past]))
            logits, present = model(t(ids[:, past:]), t(pos[:, past:]), t(mask), pkv)
        feeds = {"input_ids": ids[:, past:], "position_ids": pos[:, past:], "attention_mask": mask}
        empty = np.zeros((batch, cfg.n_head, 0, cfg.head_dim), dtype=kv_dtype)
        for i in range(cfg.n_layer):
            for j, kv in enumerate(("key", "value")):
                feeds[f"past_key_values.{i}.{kv}"] = pkv[i][j].numpy().astype(kv_dtype) if pkv else empty
        assert list(feeds) == names
        outs = session.run(None, feeds)
        ref = logits.numpy()
        real = mask[:, past:] > 0  # logits of padding positions are never used
        got = outs[0].astype(np.float32)
        if got.shape[1] == 1:  # a --logits last export: the final position only
            ref, real = ref[:, -1:], real[:, -1:]
        diff = float(np.abs(got - ref)[real].max())
        kv_diff = max(float(np.abs(o.astype(np.float32) - p.numpy()).max())
                      for o, p in zip(outs[1:], (x for kv in present for x in kv)))
        top1 = float((got.argmax(-1) == ref.argmax(-1))[real].mean())
        tol = TOLERANCE[precision] * max(1.0, float(np.abs(ref[real]).max()))
        report.cases.append(CaseResult(batch, seq, past, padded, diff, kv_diff, top1, tol))
    return report
