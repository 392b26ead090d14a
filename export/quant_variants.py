"""Measure ONNX Runtime quantization variants of the GroupQueryAttention export (the graph that
serves generation): decode-step time at each batch size and accuracy against the float32 PyTorch
forward. This is how the defaults of `onnx_quantize` were picked.

    python -m mini_engine_export.quant_variants --model random:gpt2 --batch-sizes 1,16 --rounds 3 \
        --out result/cpu/quant/ort_int8_variants

Variants are NAME=SPEC, SPEC = float32 | METHOD:BITS[:bBLOCK][:nolm][:rr][:pt] (e.g. matmulnbits:8:b32,
matmulnbits:8:b32:nolm, dynamic:8, matmulnbits:4:b32; for dynamic, rr = reduce_range (7-bit
weights), pt = one scale per tensor instead of per output channel). Speed: a fresh session per variant, round
and batch size; `--past` cached tokens, then `--steps` decode steps, the median step; variants take
turns within a round and the figure is the median over rounds. Accuracy: a fixed seeded sequence
(4 rows x 48 tokens) teacher-forced through the graph (16-token prefill, then one token a step)
against the PyTorch forward's logits at the same positions.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_VARIANTS = ("float32=float32,nbits8_b32=matmulnbits:8:b32,nbits8_b32_nolm=matmulnbits:8:b32:nolm,"
                    "nbits8_b128=matmulnbits:8:b128,dynamic8=dynamic:8,dynamic8_nolm=dynamic:8:nolm,"
                    "nbits4_b32=matmulnbits:4:b32")


def cpu_facts() -> dict:
    model, flags = platform.processor(), ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                     model)
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    return {"cpu": model, "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": " avx_vnni" in flags,
            "avx2": " avx2" in flags, "cpus": __import__("os").cpu_count()}


def parse_variant(text: str):
    from .onnx_quantize import QuantSpec

    name, _, spec = text.partition("=")
    if spec == "float32":
        return name, None
    method, bits, *rest = spec.split(":")
    block = next((int(r[1:]) for r in rest if r.startswith("b")), None)
    spec = QuantSpec.make({"8": "int8", "4": "int4"}[bits], method, block, lm_head="nolm" not in rest)
    if method == "dynamic":
        import dataclasses

        spec = dataclasses.replace(spec, reduce_range="rr" in rest, per_channel="pt" not in rest)
    return name, spec


def time_decode(path: Path, cfg, batch: int, past: int, steps: int, threads: int) -> float:
    from .onnx_gqa import GqaKV, cpu_session, run_step, step_inputs

    session = cpu_session(path, threads=threads, spinning=True)
    capacity = past + steps + 1
    kv = GqaKV.allocate(cfg, batch, capacity)
    rng = np.random.default_rng(0)
    run_step(session, kv, step_inputs(rng.integers(0, 50000, (batch, past)).tolist(), [0] * batch, capacity,
                                      cfg.n_positions))
    times = []
    for s in range(steps):
        feeds = step_inputs(rng.integers(0, 50000, (batch, 1)).tolist(), [past + s] * batch, capacity, cfg.n_positions)
        t = time.perf_counter()
        run_step(session, kv, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:]) * 1e3


# Deliberate breakage of a quantized graph, to see what "wrong rather than less precise" measures.
FAULTS = {"none": "correct graph",
          "negate_fc0": "layer 0 c_fc scales negated",
          "double_attn": "every c_attn scale doubled",
          "scales_x1.1": "every scale 10% too large",
          "roll_lm_head": "lm_head scales rolled by one output column",
          "roll_last_proj": "last layer's attn c_proj scales rolled by 7 columns"}


def _break(proto, fault: str, n_layer: int):
    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "MatMulNBits":
            scales = inits[n.input[2]]  # [N, blocks]
        elif n.op_type == "MatMulInteger":
            scales = inits[n.input[1].removesuffix("_quantized") + "_scale"]  # [N] (or a scalar per tensor)
            if not scales.dims:
                continue
        else:
            continue
        a = numpy_helper.to_array(scales).copy()
        hit = {"negate_fc0": n.name.startswith("h.0.mlp.c_fc"), "double_attn": ".attn.c_attn" in n.name,
               "scales_x1.1": True, "roll_lm_head": n.name.startswith("logits"),
               "roll_last_proj": n.name.startswith(f"h.{n_layer - 1}.attn.c_proj")}.get(fault, False)
        if not hit:
            continue
        a = {"negate_fc0": lambda: -a, "double_attn": lambda: 2 * a, "scales_x1.1": lambda: 1.1 * a,
             "roll_lm_head": lambda: np.roll(a, 1, axis=0), "roll_last_proj": lambda: np.roll(a, 7, axis=0)}[fault]()
        scales.CopyFrom(numpy_helper.from_array(a.astype(np.float32), scales.name))
    return proto


def thresholds(models: list[str], out: str | None) -> int:
    """Correct and broken int8/int4 graphs of each model: the measurement behind onnx_quantize.LIMITS."""
    import onnx
    import onnxruntime as ort

    from mini_engine.model.source import resolve_model
    from mini_engine.model.weights import build_model

    from .onnx_gqa import build_gqa_graph, cpu_session
    from .onnx_quantize import LIMITS, QuantSpec, decode_logits, fixed_sequence, logit_stats, quantize_model, \
        torch_logits

    rows = []
    with tempfile.TemporaryDirectory(prefix="quant-thresholds-") as tmp:
        for spec in models:
            source = resolve_model(spec)
            cfg = source.config
            model = build_model(source, "float32", "cpu")
            ids = fixed_sequence(cfg)
            ref = torch_logits(model, ids)[:, 15:].reshape(-1, cfg.vocab_size)
            base = build_gqa_graph(model, Path(tmp) / "float32.onnx")
            for precision in ("int8", "int4"):
                for fault in FAULTS:
                    proto, _ = quantize_model(onnx.load(str(base)), QuantSpec.make(precision), cfg)
                    path = Path(tmp) / f"{precision}_{fault}.onnx"
                    onnx.save_model(_break(proto, fault, cfg.n_layer), str(path))
                    got = decode_logits(cpu_session(path), cfg, ids, 16, "gqa").reshape(-1, cfg.vocab_size)
                    st = logit_stats(got, ref)
                    lim = LIMITS[precision]
                    verdict = "pass" if st["rel_err"] <= lim["rel_err"] and st["top1"] >= lim["top1"] else "FAIL"
                    rows.append({"model": spec if source.kind == "random" else f"seeded HF checkpoint "
                                 f"({cfg.n_layer} layers, n_embd {cfg.n_embd})", "precision": precision,
                                 "fault": fault, **st, "verdict": verdict})
                    print(f"{rows[-1]['model']} {precision} {fault}: rel_err {st['rel_err']:.4f} top-1 "
                          f"{st['top1']:.1%} -> {verdict}", file=sys.stderr)
    m = cpu_facts()
    lines = [f"Validation thresholds of quantized exports (onnx_quantize.LIMITS: int8 rel_err <= "
             f"{LIMITS['int8']['rel_err']}, top-1 >= {LIMITS['int8']['top1']:.0%}; int4 rel_err <= "
             f"{LIMITS['int4']['rel_err']}, top-1 >= {LIMITS['int4']['top1']:.0%}). onnxruntime {ort.__version__}; "
             f"CPU: {m['cpu']}, avx512_vnni {'yes' if m['avx512_vnni'] else 'no'}.", "",
             "Command: `python -m mini_engine_export.quant_variants " + " ".join(sys.argv[1:]) + "`", "",
             "GroupQueryAttention export quantized with the defaults (int8: quantize_dynamic per-channel; int4: "
             "MatMulNBits block 32; lm_head quantized), "
             "then deliberately broken; 4 x 48 seeded tokens teacher-forced (132 positions) vs the float32 "
             "PyTorch forward. rel_err = RMS(logit error) / RMS(reference logits around their row mean).", "",
             "| model | precision | graph | rel_err | top-1 | KL | max abs dlogit | verdict |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['precision']} | {FAULTS[r['fault']]} | {r['rel_err']:.4f} | "
                     f"{r['top1']:.1%} | {r['kl']:.2e} | {r['max_abs']:.3f} | {r['verdict']} |")
    if any(not m.startswith("random:") for m in models):
        lines += ["", "The seeded HF checkpoints are tests/conftest.py's make_hf_checkpoint(path) (seed 0, 2 layers, "
                  "n_embd 64: the tests' checkpoint) and make_hf_checkpoint(path, seed=1, n_layer=4, n_embd=128, "
                  "n_head=4)."]
    text = "\n".join(lines) + "\n"
    if out:
        Path(out).with_suffix(".md").write_text(text)
        Path(out).with_suffix(".json").write_text(json.dumps({"machine": m, "rows": rows}, indent=2) + "\n")
    print(text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--variants", default=DEFAULT_VARIANTS)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--past", type=int, default=32)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-speed", action="store_true", help="accuracy only")
    p.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    p.add_argument("--thresholds", default=None, metavar="MODEL,MODEL",
                   help="instead: correct and deliberately broken int8/int4 graphs of these models (the "
                        "measurement behind the validation limits)")
    args = p.parse_args(argv)
    if args.thresholds:
        return thresholds(args.thresholds.split(","), args.out)

    import onnx
    import onnxruntime as ort

    from mini_engine.model.source import resolve_model
    from mini_engine.model.weights import build_model

    from .onnx_gqa import build_gqa_graph, cpu_session, validate_gqa_graph
    from .onnx_quantize import decode_logits, fixed_sequence, logit_stats, quantize_model, torch_logits, \
        weight_bytes_per_step

    source = resolve_model(args.model)
    cfg = source.config
    model = build_model(source, "float32", "cpu")
    variants = [parse_variant(v) for v in args.variants.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    ids = fixed_sequence(cfg)
    ref = torch_logits(model, ids)[:, 15:]
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="quant-variants-") as tmp:
        base = build_gqa_graph(model, Path(tmp) / "float32.onnx")
        paths = {}
        for name, spec in variants:
            if spec is None:
                paths[name] = base
                rec = {"description": "float32 (no quantization)"}
            else:
                t0 = time.perf_counter()
                proto, rec = quantize_model(onnx.load(str(base)), spec, cfg, tmp_dir=tmp)
                paths[name] = Path(tmp) / f"{name}.onnx"
                onnx.save_model(proto, str(paths[name]))
                rec = {"description": rec["description"], "quantized_nodes": rec["quantized_nodes"],
                       "quantize_s": round(time.perf_counter() - t0, 1)}
            session = cpu_session(paths[name])
            got = decode_logits(session, cfg, ids, 16, "gqa")
            stats = logit_stats(got.reshape(-1, cfg.vocab_size), ref.reshape(-1, cfg.vocab_size))
            # The export validation's ragged scenario (prefill of unequal prompts, mixed steps): rows of
            # one call share activation scales under per-tensor dynamic quantization.
            steps = validate_gqa_graph(paths[name], model, session=session,
                                       precision=spec.precision if spec else "float32")
            stats["ragged_rel_err"] = max(r.rel_err for r in steps)
            rows[name] = dict(rec, spec=None if spec is None else spec.request(), accuracy=stats,
                              weight_bytes=weight_bytes_per_step(paths[name]),
                              file_bytes=paths[name].stat().st_size, decode_ms={b: [] for b in batches})
            print(f"{name}: rel_err {stats['rel_err']:.4f} top-1 {stats['top1']:.1%} KL {stats['kl']:.2e}",
                  file=sys.stderr)
        if not args.no_speed:
            for rnd in range(args.rounds):
                for name, _ in variants:
                    for b in batches:
                        ms = time_decode(paths[name], cfg, b, args.past, args.steps, args.threads)
                        rows[name]["decode_ms"][b].append(round(ms, 3))
                        print(f"round {rnd + 1} {name} batch {b}: {ms:.2f} ms/step", file=sys.stderr)
    report = {"command": "python -m mini_engine_export.quant_variants " + " ".join(sys.argv[1:] if argv is None
                                                                                  else argv),
              "machine": cpu_facts(), "onnxruntime": ort.__version__, "model": args.model,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "variants": rows}
    text = markdown(report, batches)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
    print(text)
    return 0


def markdown(report: dict, batches: list[int]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [f"ONNX Runtime {report['onnxruntime']} quantization variants of the GroupQueryAttention export, "
             f"{report['model']}; CPU: {m['cpu']}, {m['cpus']} CPUs, avx512_vnni "
             f"{'yes' if m['avx512_vnni'] else 'no'}, avx_vnni {'yes' if m['avx_vnni'] else 'no'}.", "",
             f"Command: `{report['command']}`", "",
             f"Decode step: {s['past']} cached tokens, median of {s['steps']} steps, median over {s['rounds']} "
             f"rounds (variants taking turns). Accuracy: 4 x 48 seeded tokens teacher-forced (16-token prefill, then "
             f"one token a step, 132 positions) vs the float32 PyTorch forward; ragged-step: the worst step of the "
             f"export validation's ragged scenario (unequal prefills, mixed prefill/decode/idle rows in one call).",
             ""]
    head = "| variant | what | weight MB/step | " + " | ".join(f"batch {b} ms/step | vs float32" for b in batches) \
        + " | rel. logit error | top-1 | KL | ragged-step rel. error |"
    lines += [head, "|" + "---|" * (3 + 2 * len(batches) + 4)]
    base = report["variants"].get("float32")
    for name, r in report["variants"].items():
        cells = [name, r["description"], f"{r['weight_bytes'] / 1e6:.1f}"]
        for b in batches:
            runs = r["decode_ms"].get(b) or r["decode_ms"].get(str(b)) or []
            if not runs:
                cells += ["-", "-"]
                continue
            med = statistics.median(runs)
            ref = statistics.median(base["decode_ms"].get(b) or base["decode_ms"][str(b)]) if base else None
            cells += [f"{med:.2f} ({', '.join(f'{x:.2f}' for x in runs)})", f"{ref / med:.2f}x" if ref else "-"]
        a = r["accuracy"]
        cells += [f"{a['rel_err']:.4f}", f"{a['top1']:.1%}", f"{a['kl']:.2e}", f"{a.get('ragged_rel_err', 0):.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
