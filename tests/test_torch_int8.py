"""The torch backend's int8 (and int4) precisions on CPU: accuracy against float32, batch invariance
under continuous batching, the kernel's exact integer sums, and one-line refusals where unsupported.

Tolerances, on seeded random checkpoints (2 layers, n_embd 64, GPT-2's vocabulary): random weights
give flat next-token distributions with near ties, so these are floors for a real checkpoint, not
estimates of it. int8 (W8A8, per-channel weights, per-row activations, lm_head int8): relative
logits error ||int8 - fp32|| / ||fp32|| <= 3 % (measured ~1.2 %), top-1 agreement >= 95 % of
positions (measured 100 %), greedy tokens identical to float32 on >= 75 % of generated tokens
(prompts identical to the end). int4 (blocks of 32, weight-only): relative error <= 12 % (~7 %).
"""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_cli
from mini_engine.errors import ConfigError
from mini_engine.model.source import resolve_model
from mini_engine.runner import RunnerConfig, StepInput
from mini_engine_backends.pytorch import TorchRunner


def logits_all(source, dtype, ids, **options):
    with TorchRunner(RunnerConfig(model=resolve_model(str(source)), dtype=dtype, options=options)) as r:
        r.allocate_kv(1, len(ids))
        step = StepInput(np.array([ids]), np.arange(len(ids))[None], np.ones((1, len(ids)), np.int64), [0], 0,
                         logits="all")
        return r.execute(step)[0]


def errors(got, ref):
    return np.linalg.norm(got - ref) / np.linalg.norm(ref), float((got.argmax(-1) == ref.argmax(-1)).mean())


IDS = np.random.default_rng(0).integers(0, 50000, 64).tolist()


@pytest.fixture(scope="module")
def ref_logits(hf_dir):
    return logits_all(hf_dir, "float32", IDS)


@pytest.mark.parametrize("options", [{}, {"lm_head": "float32"}], ids=["lm_head-int8", "lm_head-float32"])
def test_int8_logits_close_to_float32(hf_dir, ref_logits, options):
    rel, top1 = errors(logits_all(hf_dir, "int8", IDS, **options), ref_logits)
    assert rel <= 0.03 and top1 >= 0.95, (rel, top1)


def test_int4_logits_close_to_float32(hf_dir, ref_logits):
    rel, top1 = errors(logits_all(hf_dir, "int4", IDS), ref_logits)
    assert rel <= 0.12 and top1 >= 0.8, (rel, top1)


def _generate(model, dtype, prompts, n, **sections):
    from mini_engine import Engine
    from mini_engine.sampling import SamplingParams

    with Engine.from_config(None, model=str(model), backend="torch", dtype=dtype, **sections) as engine:
        assert engine.continuous, engine.static_reason
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[int(out.request_id)] = out.completion.token_ids
        return [done[i] for i in range(len(prompts))]


def prompts(n, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 50000, int(rng.integers(3, 30))).tolist() for _ in range(n)]


def test_int8_greedy_agrees_with_float32(hf_dir):
    ps = prompts(6)
    ref = _generate(hf_dir, "float32", ps, 12)
    got = _generate(hf_dir, "int8", ps, 12)
    agree = []
    for a, b in zip(got, ref):  # tokens identical up to the first divergence
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        agree.append(same / len(a))
    assert np.mean(agree) >= 0.75, agree


def test_int8_continuous_batching_matches_each_request_alone(hf_dir):
    """Per-row activation scales: a row's int8 result must not depend on the rows beside it."""
    from mini_engine import Engine
    from mini_engine.sampling import SamplingParams

    ps = prompts(6, seed=2)
    alone = [_generate(hf_dir, "int8", [p], 10)[0] for p in ps]
    # Staggered arrivals and small chunks: steps mix prefill chunks and decodes of several requests.
    with Engine.from_config(None, model=str(hf_dir), backend="torch", dtype="int8",
                            **{"scheduler.max_num_batched_tokens": 8, "scheduler.block_size": 4}) as engine:
        assert engine.continuous, engine.static_reason
        params = SamplingParams(max_new_tokens=10, ignore_eos=True, logprobs=0)
        pending, done, step = list(range(len(ps))), {}, 0
        while pending or engine.has_unfinished_requests():
            if pending and step % 2 == 0:
                i = pending.pop(0)
                engine.add_request(str(i), ps[i], params)
            for out in engine.step():
                if out.finished:
                    done[int(out.request_id)] = out.completion
            step += 1
    assert [done[i].token_ids for i in range(len(ps))] == alone


def test_int8_rows_are_batch_invariant_in_the_layer():
    """The layer alone: each row quantized on its own, exact int32 sums, so a batch of rows gives
    bit-identical rows to each row alone, and the result equals the integer math in float64."""
    import torch

    from mini_engine_backends.pytorch.int8_linear import Int8Linear, quantize_weight_int8

    torch.manual_seed(0)
    w, b = torch.randn(96, 192) * 0.05, torch.randn(96) * 0.01
    x = torch.randn(7, 192)
    x[3] *= 100  # one row with a far larger range must not change the others
    layer = Int8Linear(w, b)
    with torch.inference_mode():
        together = layer(x)
        alone = torch.cat([layer(x[i:i + 1]) for i in range(len(x))])
    assert torch.equal(together, alone)
    q, s = quantize_weight_int8(w)
    xs = x.abs().amax(1, keepdim=True).double() / layer.levels
    exact = torch.round(x.double() / xs) @ q.double().t() * s.double() * xs + b.double()
    assert torch.allclose(together.double(), exact, rtol=1e-5, atol=1e-6)


def test_int8_batch1_gemv_is_bit_identical_to_the_onednn_layer():
    """Batch-1 decode runs a numba GEMV (no torch op); it must give the oneDNN layer's exact values,
    so a request's tokens do not depend on whether it decodes alone or beside others."""
    import torch

    from mini_engine_backends.pytorch.int8_linear import Int8Gemv, Int8Linear

    torch.manual_seed(1)
    for n, k, bias in ((96, 64, True), (256, 192, True), (160, 64, False), (1024, 1024, True)):  # last: split
        layer = Int8Linear(torch.randn(n, k) * 0.05, torch.randn(n) * 0.01 if bias else None)
        x = torch.randn(5, k)
        with torch.inference_mode():
            rows = layer(x).numpy()
        for threads in (1, 2):
            gemv = Int8Gemv(layer, threads)
            assert gemv.shares == (threads if n * k >= 1 << 20 else 1)
            assert np.array_equal(np.stack([gemv(r) for r in x.numpy()]), rows)


def test_int8_single_row_steps_run_no_torch_ops():
    from torch.profiler import profile

    with TorchRunner(RunnerConfig(model=resolve_model("random:tiny"), dtype="int8")) as r:
        assert r.describe()["gemv"].startswith("int8 numba GEMV")
        r.allocate_kv(1, 4)
        r.execute(StepInput(np.array([[5, 6, 7]]), np.arange(3)[None], np.ones((1, 3), np.int64), [0], 0))
        with profile() as prof:
            out = r.execute(StepInput(np.array([[8]]), np.array([[3]]), np.ones((1, 4), np.int64), [0], 3))
        assert [e.name for e in prof.events()] == [] and np.isfinite(out).all()


# An AVX2-only x86 (as AMD Zen 3) simulated on any x86: oneDNN's and ATen's ISA caps, numba compiling for
# Haswell without AVX-512 (in a cache of its own).
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "NUMBA_CPU_NAME": "haswell",
             "NUMBA_CPU_FEATURES": "+64bit,+avx,+avx2,+fma,+sse4.2,+sse4.1,+ssse3,+sse3,+sse2,+sse,+cx16,+popcnt,"
                                   "+bmi,+bmi2,+f16c,+lzcnt,+movbe,+cmov,+fxsr,+xsave"}


def test_int8_without_vnni_uses_7_bit_activations_and_stays_exact(tmp_path):
    """Pre-VNNI x86 saturates u8 x s8 pair sums in int16; the load-time probe sees it and quantizes
    activations to |q| <= 63, which keeps the integer sums exact; the batch-1 GEMV, compiled without
    AVX-512, still gives the oneDNN layer's values bit for bit."""
    code = (
        "import numpy as np, torch\n"
        "from mini_engine_backends.pytorch.int8_linear import Int8Gemv, Int8Linear, activation_levels, "
        "quantize_weight_int8\n"
        "torch.manual_seed(0); w = torch.randn(1024, 1024); x = torch.randn(4, 1024)\n"
        "layer = Int8Linear(w, torch.randn(1024)); q, s = quantize_weight_int8(w)\n"
        "xs = x.abs().amax(1, keepdim=True).double() / layer.levels\n"
        "exact = torch.round(x.double() / xs) @ q.double().t() * s.double() * xs + layer.bias.double()\n"
        "with torch.inference_mode(): y = layer(x)\n"
        "gemv = Int8Gemv(layer, 2)\n"
        "same = np.array_equal(np.stack([gemv(r) for r in x.numpy()]), y.numpy())\n"
        "print(activation_levels(), float((y.double() - exact).abs().max() / exact.abs().max()), same)\n")
    import os

    env = {**os.environ, **AVX2_ONLY, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    levels, err, same = out.stdout.split()
    assert int(levels) == 63 and float(err) < 1e-5 and same == "True"


def test_describe_records_the_quantization_and_weight_bytes():
    with TorchRunner(RunnerConfig(model=resolve_model("random:tiny"), dtype="int8")) as r:
        q = r.describe()["quantization"]
        assert q["precision"] == "int8" and "per output channel" in q["weight_granularity"]
        assert "per row" in q["activation_granularity"] and "oneDNN" in q["kernel"]
        assert q["layers_quantized"] == 8 and q["kv_cache"] == "float32" and q["lm_head"].startswith("int8")
        assert r.paged_unsupported_reason() is None
        fp32_bytes = r.config.model.config.weight_bytes("float32")
        assert r.weight_bytes == q["weight_bytes_per_step"] and r.weight_bytes < fp32_bytes / 3.5
    with TorchRunner(RunnerConfig(model=resolve_model("random:tiny"), dtype="int8",
                                  options={"lm_head": "float32"})) as r:
        cfg = r.config.model.config
        # float32 head: the token embedding counted at 4 bytes, as in the float32 figure
        assert r.weight_bytes > cfg.vocab_size * cfg.n_embd * 4
        assert r.describe()["quantization"]["lm_head"].startswith("float32")


def test_int8_on_cuda_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^dtype int8 on cuda is not supported by the torch backend .*"
                                          r"use float16 or bfloat16$"):
        TorchRunner(RunnerConfig(model=resolve_model("random:tiny"), device="cuda", dtype="int8")).load()


def test_bad_int4_block_size_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="int4_block_size 128 does not divide"):
        TorchRunner(RunnerConfig(model=resolve_model("random:tiny"), dtype="int4",
                                 options={"int4_block_size": 128})).load()


def test_cli_generate_int8():
    proc = run_cli("generate", "--backend", "torch", "--dtype", "int8", "-m", "random:tiny", "-n", 4, "--json",
                   "Hello world", check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["token_ids"]) == 4 and out["backend"] == "torch"
    assert "continuous batching" in proc.stderr  # int8 runs on the paged path


def test_cli_generate_int8_on_cuda_says_so_in_one_line():
    proc = run_cli("generate", "--backend", "torch", "--dtype", "int8", "--device", "cuda", "-m", "random:tiny",
                   "Hi")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "int8" in lines[0] and "cuda" in lines[0], proc.stderr
