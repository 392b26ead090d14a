"""Probe: would torch.compile (inductor, weight freezing) speed up the torch backend's decode step on CPU?

One decode step of the engine's GPT-2 forward (batch B, a past of P tokens, logits for the
last position), timed three ways in one process: eager with aten linears, eager with the
backend's oneDNN-prepacked linears (its default on CPU), and torch.compile with
`freezing` + weight prepacking over static shapes. Prints the median step time of each.

    python benchmarks/torch_compile_probe.py --model random:gpt2 --batch 1 --past 64

The compiled variant bakes in the past length: a backend using it needs a static-shape
decode (full-length KV with a mask, as the CUDA-graph path does), one compile per shape.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:gpt2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--past", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    from mini_engine.model.gpt2 import ConcatKV
    from mini_engine.model.source import resolve_model
    from mini_engine.model.weights import build_model
    from mini_engine_backends.pytorch.linears import replace_linears

    source = resolve_model(args.model)
    cfg = source.config
    b, past = args.batch, args.past
    ids = torch.ones(b, 1, dtype=torch.long)
    pos = torch.full((b, 1), past)
    mask = torch.ones(b, past + 1, dtype=torch.long)
    pkv = [(torch.randn(b, cfg.n_head, past, cfg.head_dim), torch.randn(b, cfg.n_head, past, cfg.head_dim))
           for _ in range(cfg.n_layer)]

    def step_of(model):
        def step(ids, pos, mask, pkv):
            return model.step(ids, pos, mask, ConcatKV(pkv), last_only=True)
        return step

    def median_ms(fn) -> float:
        with torch.no_grad():
            for _ in range(5):
                fn(ids, pos, mask, pkv)
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                fn(ids, pos, mask, pkv)
                times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2] * 1e3

    print(f"{args.model} float32, batch {b}, past {past}, {torch.get_num_threads()} threads, "
          f"median of {args.steps} decode steps")
    model = build_model(source, "float32", "cpu").eval()
    print(f"  eager, aten linears:           {median_ms(step_of(model)):6.1f} ms")
    compiled_src = build_model(source, "float32", "cpu").eval()
    replace_linears(model)
    print(f"  eager, oneDNN-packed linears:  {median_ms(step_of(model)):6.1f} ms")

    import torch._inductor.config as inductor

    inductor.freezing = True
    inductor.cpp.weight_prepack = True
    compiled = torch.compile(step_of(compiled_src), dynamic=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(ids, pos, mask, pkv)
    compile_s = time.perf_counter() - t0
    print(f"  torch.compile, freezing:       {median_ms(compiled):6.1f} ms  (compile {compile_s:.0f} s)")


if __name__ == "__main__":
    main()
