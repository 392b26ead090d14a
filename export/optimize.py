"""ONNX Runtime's transformer graph optimizer for GPT-2, with the plain graph as fallback."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import manifest as mf


def optimize_gpt2(path: Path, cfg, external: bool, log) -> dict:
    """Fuse LayerNorm/GELU/attention patterns in place; keep `path` unchanged if anything fails.

    Returns what the manifest records: whether fusion was applied, the fused-op counts,
    and the reason when it was not.
    """
    tmp = path.with_name("optimized.onnx")
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        # opt_level=0: only the Python fusions; ORT's own graph optimisations run at
        # session creation anyway, and baking them in would tie the file to one provider.
        try:
            model_type = "gpt2"
            model = optimize_model(str(path), model_type=model_type, num_heads=cfg.n_head,
                                   hidden_size=cfg.n_embd, opt_level=0)
        except IndexError:
            # The gpt2 post-pass assumes an lm_head Gemm with a bias; our tied lm_head
            # has none. The generic pass has the same LayerNorm/GELU fusions, and the
            # gpt2 attention pattern does not match current exports anyway.
            model_type = "bert"
            model = optimize_model(str(path), model_type=model_type, num_heads=cfg.n_head,
                                   hidden_size=cfg.n_embd, opt_level=0)
        fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        model.save_model_to_file(str(tmp), use_external_data_format=external)
        _check_same_outputs(path, tmp, cfg)
    except Exception as e:  # any failure of an optional rewrite: keep the plain graph
        for f in path.parent.glob("optimized.onnx*"):
            f.unlink()
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"graph optimizer failed ({reason}); keeping the unoptimized graph")
        return {"requested": True, "applied": False, "error": reason}
    for f in path.parent.glob(path.name + "*"):
        f.unlink()
    tmp.rename(path)
    if external:
        (path.parent / "optimized.onnx.data").rename(path.parent / (path.name + ".data"))
        _relocate_external_data(path, path.name + ".data")
    log(f"fused operators ({model_type} fusions): " + (", ".join(f"{k} {v}" for k, v in fused.items()) or "none"))
    return {"requested": True, "applied": True, "fusions": model_type, "fused": fused}


def _check_same_outputs(reference: Path, candidate: Path, cfg) -> None:
    """One decode step through both graphs must agree before the fused one replaces the original."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    b, past = 2, 3
    feeds = {"input_ids": rng.integers(0, cfg.vocab_size, (b, 1), dtype=np.int64),
             "position_ids": np.full((b, 1), past, dtype=np.int64),
             "attention_mask": np.ones((b, past + 1), dtype=np.int64)}
    for name in mf.input_names(cfg.n_layer)[3:]:
        feeds[name] = rng.standard_normal((b, cfg.n_head, past, cfg.head_dim)).astype(np.float32)
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
            for p in (reference, candidate)]
    scale = max(1.0, float(np.abs(outs[0]).max()))
    if not np.allclose(outs[0], outs[1], atol=1e-4 * scale, rtol=0):
        raise ValueError(f"fused graph differs from the original by {np.abs(outs[0] - outs[1]).max():.2e}")


def _relocate_external_data(path: Path, location: str) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))
