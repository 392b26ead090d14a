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
# Tolerances relative to the logits' scale: max |diff| <= TOL * max(1, max |logits|). Quantized
# graphs (int8, int4) are held to onnx_quantize.LIMITS instead: a relative logit error per case and
# a top-1 agreement over a teacher-forced decode, which tell a wrong graph from quantization error.
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}


QUANTIZED = ("int8", "int4")


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
    rel_err: float = 0.0  # onnx_quantize.logit_stats' relative logit error
    precision: str = "float32"

    @property
    def passed(self) -> bool:
        if self.precision in QUANTIZED:
            # Few positions per case: the top-1 gate is DecodeCheck's, pooled over many.
            return self.rel_err <= _limits(self.precision)["rel_err"]
        return self.logits_diff <= self.tol and self.top1 >= 0.99


def _limits(precision: str) -> dict:
    from .onnx_quantize import LIMITS

    return LIMITS[precision]


@dataclass
class DecodeCheck:
    """A quantized graph against the float32 PyTorch forward over a teacher-forced fixed sequence
    (onnx_quantize.fixed_sequence): the top-1 agreement and relative logit error, pooled."""

    precision: str
    stats: dict

    @property
    def passed(self) -> bool:
        lim = _limits(self.precision)
        return self.stats["rel_err"] <= lim["rel_err"] and self.stats["top1"] >= lim["top1"]

    def line(self) -> str:
        lim, st = _limits(self.precision), self.stats
        return (f"teacher-forced decode, {st['positions']} positions: top-1 agreement {st['top1']:.1%} "
                f"(limit {lim['top1']:.0%}), relative logit error {st['rel_err']:.4f} (limit {lim['rel_err']:.2f}), "
                f"KL {st['kl']:.2e}, max |dlogit| {st['max_abs']:.3f}: {'pass' if self.passed else 'FAIL'}")

    def summary(self) -> dict:
        return dict(self.stats, passed=self.passed, limits=_limits(self.precision))


def decode_check(session, model, cfg, precision: str, contract: str) -> DecodeCheck:
    from .onnx_quantize import decode_logits, fixed_sequence, logit_stats, torch_logits

    ids = fixed_sequence(cfg)
    prefill = min(16, ids.shape[1] - 1)
    got = decode_logits(session, cfg, ids, prefill, contract)
    ref = torch_logits(model, ids)[:, prefill - 1:]
    return DecodeCheck(precision, logit_stats(got.reshape(-1, cfg.vocab_size), ref.reshape(-1, cfg.vocab_size)))


def quantized_failure(precision: str, rel_err: float, where: str, decode: DecodeCheck | None) -> str:
    """One line: why a quantized graph is wrong rather than merely less precise."""
    lim = _limits(precision)
    if rel_err > lim["rel_err"]:
        return (f"the {precision} graph is wrong, not merely less precise: relative logit error {rel_err:.3f} at "
                f"{where} (quantization error stays under {lim['rel_err']:.2f})")
    st = decode.stats
    return (f"the {precision} graph is wrong, not merely less precise: top-1 agreement with float32 "
            f"{st['top1']:.1%} < {lim['top1']:.0%} (relative logit error {st['rel_err']:.3f}, limit "
            f"{lim['rel_err']:.2f}) over a {st['positions']}-position teacher-forced decode")


@dataclass
class Report:
    precision: str
    provider: str
    cases: list[CaseResult] = field(default_factory=list)
    skipped: str | None = None
    decode: DecodeCheck | None = None  # quantized graphs

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases) and (self.decode is None or self.decode.passed)

    def failure(self) -> str:
        if self.precision in QUANTIZED:
            c = max(self.cases, key=lambda c: c.rel_err)
            return quantized_failure(self.precision, c.rel_err, f"batch {c.batch} seq {c.seq} past {c.past}",
                                     self.decode)
        bad = [c for c in self.cases if not c.passed]
        c = max(bad, key=lambda c: c.logits_diff / c.tol)
        return (f"batch {c.batch} seq {c.seq} past {c.past}: max |logits diff| {c.logits_diff:.2e} > {c.tol:.1e} "
                f"or top-1 agreement {c.top1:.1%} < 99%")

    def table(self) -> str:
        if self.skipped:
            return f"validation skipped: {self.skipped}"
        quant = self.precision in QUANTIZED
        last = ("rel.err", "limit") if quant else ("tolerance",)
        rows = [("batch", "seq", "past", "padded", "max|dlogits|", "max|dKV|", "top-1") + last + ("result",)]
        for c in self.cases:
            tail = (f"{c.rel_err:.4f}", f"{_limits(c.precision)['rel_err']:.2f}") if quant else (f"{c.tol:.1e}",)
            rows.append((str(c.batch), str(c.seq), str(c.past), "yes" if c.padded else "no", f"{c.logits_diff:.2e}",
                         f"{c.kv_diff:.2e}", f"{c.top1:.1%}") + tail + ("pass" if c.passed else "FAIL",))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        what = f"{self.precision} graph vs the float32 forward" if quant else self.precision
        lines = [f"validation vs the PyTorch forward ({what}, {self.provider}):"]
        lines += ["  " + "  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
        if self.decode is not None:
            lines.append("  " + self.decode.line())
        lines.append("validation " + ("passed" if self.passed else "FAILED"))
        return "\n".join(lines)

    def summary(self) -> dict:
        if self.skipped:
            return {"skipped": self.skipped}
        worst = max((c.logits_diff for c in self.cases), default=0.0)
        out = {"passed": self.passed, "provider": self.provider, "cases": len(self.cases),
               "max_logits_diff": worst, "min_top1": min((c.top1 for c in self.cases), default=1.0)}
        if self.precision in QUANTIZED:
            out.update(precision=self.precision, max_rel_err=max((c.rel_err for c in self.cases), default=0.0))
            if self.decode is not None:
                out["decode"] = self.decode.summary()
        return out


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

    from .onnx_quantize import logit_stats

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
        tol = TOLERANCE.get(precision, 0.0) * max(1.0, float(np.abs(ref[real]).max()))
        rel = logit_stats(got[real], ref[real])["rel_err"]
        report.cases.append(CaseResult(batch, seq, past, padded, diff, kv_diff, top1, tol, rel, precision))
    if precision in QUANTIZED:
        report.decode = decode_check(session, model, cfg, precision, "concat")
    return report
