#!/usr/bin/env python
"""Train a small GPT-2 on local English text: a trained checkpoint for accuracy measurements here.

No model hub is reachable from this machine, so int8/int4 accuracy was only measurable on seeded
random weights, whose near-uniform next-token distributions flip their argmax on tiny errors and
make perplexity meaningless. A model trained for a few minutes is no GPT-2, but its distributions
are peaked where text is predictable, as a real checkpoint's are; `mini-engine compare` on it reports
top-1 agreement, KL and perplexity with that property. Say "proxy" wherever its figures are used.

Corpus: the English text files of this Python installation (LICENSE, README, *.txt, *.rst, *.md
under sys.base_prefix and the environment's site-packages), sorted by path, read up to --corpus-mb,
minus any file holding compare's fixed text (it is held out). The corpus differs between machines:
its size and SHA-256 go into the checkpoint's train_info.json.

    python benchmarks/train_proxy_checkpoint.py --out ~/.cache/mini-engine/proxy-gpt2 --minutes 20 \
        --layers 4 --width 256 --heads 4 --batch 16 --seq 128 --corpus-mb 8 --lr 2e-3
    mini-engine compare --model ~/.cache/mini-engine/proxy-gpt2 \
        --targets torch:cpu@float32,onnxruntime:cpu@int8,torch:cpu@int8,onnxruntime:cpu@int4
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import cpu_model  # noqa: E402

SUFFIXES = {".txt", ".rst", ".md"}
NAMES = {"LICENSE", "README", "COPYING", "NOTICE", "AUTHORS"}


def corpus_files(roots: list[Path]) -> list[Path]:
    files = set()
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and (p.suffix.lower() in SUFFIXES or p.name.split(".")[0].upper() in NAMES):
                files.add(p)
    return sorted(files)


def read_corpus(limit_bytes: int, held_out: str) -> tuple[str, int]:
    import site
    import sysconfig

    roots = [Path(sys.base_prefix) / "lib", *(Path(p) for p in site.getsitepackages()),
             Path(sysconfig.get_paths()["purelib"])]
    parts, size, n = [], 0, 0
    probe = held_out[:60]
    for f in corpus_files([r for r in dict.fromkeys(roots) if r.is_dir()]):
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if probe in text or sum(c.isalpha() or c.isspace() for c in text[:4000]) < 0.8 * min(len(text), 4000):
            continue  # the held-out text, or mostly not prose (tables, data, code)
        parts.append(text)
        size += len(text.encode())
        n += 1
        if size >= limit_bytes:
            break
    return "\n\n".join(parts), n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="checkpoint directory to write (save_pretrained)")
    p.add_argument("--minutes", type=float, default=12.0, help="training time budget")
    p.add_argument("--max-steps", type=int, default=5000)
    p.add_argument("--corpus-mb", type=float, default=24.0)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import mini_engine  # noqa: F401 - before numpy (OpenBLAS settings)
    import numpy as np
    import torch
    from mini_engine.compare import DEFAULT_TEXT
    from mini_engine.tokenizer import gpt2_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    t0 = time.perf_counter()
    text, n_files = read_corpus(int(args.corpus_mb * 2**20), DEFAULT_TEXT)
    tok = gpt2_tokenizer()
    ids = np.array(tok.encode(text), np.int64)
    print(f"corpus: {n_files} files, {len(text.encode()) / 2**20:.1f} MiB, {len(ids):,} tokens "
          f"({time.perf_counter() - t0:.0f} s to read and tokenize)")
    if len(ids) < 50 * (args.seq + 1):
        print(f"error: the corpus has {len(ids)} tokens, too few for --seq {args.seq}; raise --corpus-mb",
              file=sys.stderr)
        return 2
    split = int(len(ids) * 0.98)
    train, val = ids[:split], ids[split:]

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads, n_positions=1024,
                     vocab_size=tok.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = 50

    def batch(data):
        starts = rng.integers(0, len(data) - args.seq - 1, args.batch)
        return torch.from_numpy(np.stack([data[s:s + args.seq] for s in starts]))

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            xs = [torch.from_numpy(val[i:i + args.seq][None]) for i in range(0, len(val) - args.seq, args.seq)][:32]
            loss = float(np.mean([model(x, labels=x).loss.item() for x in xs]))
        model.train()
        return loss

    budget = args.minutes * 60
    start, step, log = time.perf_counter(), 0, []
    model.train()
    while step < args.max_steps and time.perf_counter() - start < budget:
        # Warm-up, then cosine decay over the time budget (the step count is not known ahead).
        frac = min(1.0, (time.perf_counter() - start) / budget)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch(train)
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            log.append({"step": step, "s": round(time.perf_counter() - start), "train_loss": round(loss.item(), 3)})
            print(f"step {step} ({log[-1]['s']} s): train loss {loss.item():.3f}", flush=True)
    final_val = val_loss()
    print(f"{step} steps in {time.perf_counter() - start:.0f} s; validation loss {final_val:.3f} "
          f"(perplexity {math.exp(final_val):.0f})")

    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok._tok.save_pretrained(out)
    info = {"what": "proxy checkpoint: a small GPT-2 trained briefly on local text (not a real GPT-2)",
            "command": "python benchmarks/train_proxy_checkpoint.py " + " ".join(sys.argv[1:]),
            "cpu": cpu_model(), "steps": step, "tokens_seen": step * args.batch * args.seq,
            "val_loss": round(final_val, 4), "val_perplexity": round(math.exp(final_val), 1),
            "corpus": {"files": n_files, "bytes": len(text.encode()), "tokens": int(len(ids)),
                       "sha256": hashlib.sha256(text.encode()).hexdigest()},
            "config": {"n_layer": args.layers, "n_embd": args.width, "n_head": args.heads, "seq": args.seq,
                       "batch": args.batch, "lr": args.lr, "seed": args.seed}, "log": log}
    (out / "train_info.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
