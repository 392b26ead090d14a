#!/usr/bin/env python
"""How peaked a checkpoint's next-token distributions are on compare's fixed text: the gap between
its top-1 and top-2 logits at each position, and how often that gap exceeds a given logit error.

A quantized model flips a position's argmax only where its logit errors can close that gap: where
the gap exceeds twice the largest error (the two logits moving in opposite directions), no flip
is possible; below one error, a flip takes little. So the same int8 error costs seeded random
weights (near-flat distributions) far more top-1 agreement than a trained checkpoint. This puts
numbers on that.

    python benchmarks/logit_margin.py --models ~/.cache/mini-engine/proxy-gpt2,random:gpt2 --error 0.2
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="comma-separated model specs (checkpoint dirs, random:NAME)")
    p.add_argument("--error", type=float, default=0.2, help="a max |logit error| to compare the gaps with")
    args = p.parse_args(argv)

    import mini_engine  # noqa: F401 - before numpy (OpenBLAS settings)
    import numpy as np
    import torch
    from mini_engine.compare import DEFAULT_TEXT
    from mini_engine.model.source import resolve_model
    from mini_engine.model.weights import build_model
    from mini_engine.tokenizer import gpt2_tokenizer

    sources = [resolve_model(spec) for spec in args.models.split(",")]  # every spec checked before any output
    ids = gpt2_tokenizer().encode(DEFAULT_TEXT)
    print(f"compare's fixed text, {len(ids) - 1} next-token positions")
    e, e2 = args.error, 2 * args.error
    print(f"| model | median top-1 - top-2 logit gap | gap > {e:g} | gap > {e2:g} (no flip possible) | "
          f"median top-1 probability |")
    print("|---|---:|---:|---:|---:|")
    for source in sources:
        spec = source.spec
        model = build_model(source, "float32", "cpu")
        x = torch.tensor([ids])
        with torch.inference_mode():
            logits = model(x, torch.arange(len(ids))[None], torch.ones_like(x))[0][0, :-1].float()
        top2 = logits.topk(2, -1).values
        gap = (top2[:, 0] - top2[:, 1]).numpy()
        p1 = torch.softmax(logits, -1).max(-1).values.numpy()
        print(f"| {spec} | {np.median(gap):.3f} | {np.mean(gap > e):.0%} | {np.mean(gap > e2):.0%} | "
              f"{np.median(p1):.3f} |")
    return 0


if __name__ == "__main__":
    from mini_engine.errors import MiniEngineError

    try:
        sys.exit(main())
    except MiniEngineError as e:  # a bad model, dtype or export: one line, not a traceback
        sys.exit(f"error: {e}")
