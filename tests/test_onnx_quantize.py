"""int8 / int4 ONNX exports (mini_engine_export.onnx_quantize): export, validation, the onnxruntime
backend on them (continuous batching, the async front), and the one-line refusals."""
import asyncio
import json
import shutil

import numpy as np
import onnx
import pytest

from conftest import run_cli

ort = pytest.importorskip("onnxruntime")

from mini_engine_export import onnx_quantize as oq  # noqa: E402

# Greedy tokens of the int8 / int4 onnxruntime runs that must equal the float32 torch run's, on the
# seeded test checkpoint (hf_dir: 2 layers, n_embd 64), 4 prompts x 12 tokens. Measured: int8
# 100%, int4 ~88% (int4's near-flat random-weight distributions flip argmaxes); the bounds leave room.
INT8_TOKEN_SHARE, INT4_TOKEN_SHARE = 0.95, 0.6
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):", "In a shocking finding"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ort-quant-cache")


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """`mini-engine export onnx --quantize int8` of random:tiny (concat contract)."""
    out = tmp_path_factory.mktemp("q") / "tiny8"
    proc = run_cli("export", "onnx", "--model", "random:tiny", "--quantize", "int8", "--out", out, check=True)
    return out, proc


@pytest.fixture(scope="module")
def tiny8_gqa(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny8_gqa"
    proc = run_cli("export", "onnx", "--model", "random:tiny", "--quantize", "int8", "--kv-cache", "gqa",
                   "--out", out, check=True)
    return out, proc


def test_quantized_export_validates_and_the_manifest_records_the_quantization(tiny8):
    out, proc = tiny8
    assert "validation passed" in proc.stderr and "FAIL" not in proc.stderr
    assert "quantized 9 weight matrices (8 in 2 layers + the lm_head)" in proc.stderr
    assert "teacher-forced decode" in proc.stderr
    m = json.loads((out / "manifest.json").read_text())
    q = m["quantization"]
    # int8's measured default: quantize_dynamic (W8A8, per-output-channel weight scales).
    assert m["precision"] == "int8" and m["request"]["quantization"] == {
        "method": "dynamic", "bits": 8, "block_size": 0, "lm_head": True, "symmetric": True,
        "reduce_range": False, "per_channel": True}
    assert q["quantized_nodes"] == 9 and q["quantized_ops"] == ["MatMulInteger"]
    assert q["lm_head"] is True and len(q["weights"]) == 9 and q["weights"][q["lm_head_node"]] == [64, 50257]
    assert m["validation"]["passed"] and m["validation"]["decode"]["top1"] >= oq.LIMITS["int8"]["top1"]
    assert m["validation"]["max_rel_err"] < oq.LIMITS["int8"]["rel_err"]
    graph = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("MatMulInteger") == 9 and "Gemm" not in ops
    # A step reads the quantized weights: about a quarter of the float32 bytes (scales: 1/8 more).
    from mini_engine.model.source import resolve_model

    float_bytes = resolve_model("random:tiny").config.weight_bytes("float32")
    assert m["weight_bytes_per_step"] == oq.weight_bytes_per_step(out / "model.onnx") < 0.3 * float_bytes


def test_both_contracts_quantize_and_the_lm_head_can_stay_float(tmp_path):
    import onnx as onnx_

    from mini_engine.model.source import resolve_model
    from mini_engine.model.weights import build_model
    from mini_engine_export.onnx_gqa import build_gqa_graph

    cfg = resolve_model("random:tiny").config
    path = build_gqa_graph(build_model(resolve_model("random:tiny")), tmp_path / "g.onnx")
    # The gqa graph writes every dense layer as Gemm, which the quantizers skip: they are rewritten first.
    assert sum(n.op_type == "Gemm" for n in onnx_.load(str(path)).graph.node) == 9
    for spec, nbits, gemm in ((oq.QuantSpec.make("int8", "matmulnbits"), 9, 0),
                              (oq.QuantSpec.make("int8", "matmulnbits", lm_head=False), 8, 1),
                              (oq.QuantSpec.make("int4", block_size=64), 9, 0)):
        proto, rec = oq.quantize_model(onnx_.load(str(path)), spec, cfg)
        ops = [n.op_type for n in proto.graph.node]
        assert ops.count("MatMulNBits") == nbits == rec["quantized_nodes"] and ops.count("Gemm") == gemm
        assert rec["bits"] == spec.bits and rec["block_size"] == spec.block_size and rec["lm_head"] == spec.lm_head
        assert rec["accuracy_level"] == 4
    for lm_head, n in ((True, 9), (False, 8)):
        proto, rec = oq.quantize_model(onnx_.load(str(path)), oq.QuantSpec.make("int8", lm_head=lm_head), cfg)
        assert rec["method"] == "dynamic" and rec["block_size"] == 0
        assert rec["quantized_nodes"] == n and rec["quantized_ops"] == ["MatMulInteger"]
        # GroupQueryAttention leaves padding positions uninitialized; a per-tensor activation scale
        # must not see them (each layer's attention output is masked).
        assert rec["padding_masked"] == cfg.n_layer


def test_a_quantizer_that_skips_the_weights_is_an_error(tmp_path, monkeypatch):
    from mini_engine.model.source import resolve_model
    from mini_engine.model.weights import build_model
    from mini_engine_export.onnx_gqa import build_gqa_graph

    cfg = resolve_model("random:tiny").config
    path = build_gqa_graph(build_model(resolve_model("random:tiny")), tmp_path / "g.onnx")
    # Without the Gemm -> MatMul rewrite MatMulNBitsQuantizer quantizes nothing, silently.
    monkeypatch.setattr(oq, "gemm_to_matmul", lambda proto, lm_head: (0, "logits"))
    with pytest.raises(oq.QuantizeError, match="quantized 0 of the 9 weight matrices"):
        oq.quantize_model(onnx.load(str(path)), oq.QuantSpec.make("int8", "matmulnbits"), cfg)


@pytest.mark.parametrize("method", ["dynamic", "matmulnbits"])
def test_a_wrong_quantized_graph_fails_validation_in_one_line(tmp_path, method):
    """Negated scales of one layer: wrong, not merely less precise (relative logit error ~1)."""
    from mini_engine.model.source import resolve_model
    from mini_engine.model.weights import build_model
    from mini_engine_export.onnx_gqa import GqaValidation, build_gqa_graph, cpu_session, validate_gqa_graph
    from mini_engine_export.quant_variants import _break
    from mini_engine_export.validate import decode_check

    model = build_model(resolve_model("random:tiny"))
    path = build_gqa_graph(model, tmp_path / "g.onnx")

    def report(proto):
        onnx.save(proto, str(tmp_path / "q.onnx"))
        session = cpu_session(tmp_path / "q.onnx")
        return GqaValidation(validate_gqa_graph(tmp_path / "q.onnx", model, session=session, precision="int8"),
                             "int8", decode_check(session, model, model.cfg, "int8", "gqa"))

    spec = oq.QuantSpec.make("int8", method)
    good = report(oq.quantize_model(onnx.load(str(path)), spec, model.cfg)[0])
    assert good.passed and good.decode.stats["top1"] >= oq.LIMITS["int8"]["top1"]
    bad = report(_break(oq.quantize_model(onnx.load(str(path)), spec, model.cfg)[0], "negate_fc0", 2))
    assert not bad.passed
    line = bad.failure()
    assert "\n" not in line and "wrong, not merely less precise" in line and "relative logit error" in line


def test_engine_int8_continuous_batching_agrees_with_float32(hf_dir, cache):
    from mini_engine import Engine

    with Engine(model=str(hf_dir), backend="torch") as ref:
        want = [c.token_ids for c in ref.generate(PROMPTS, max_new_tokens=12, temperature=0.0, ignore_eos=True)]
    for dtype, share in (("int8", INT8_TOKEN_SHARE), ("int4", INT4_TOKEN_SHARE)):
        with Engine(model=str(hf_dir), backend="onnxruntime", dtype=dtype, cache_dir=str(cache)) as engine:
            assert engine.continuous  # the gqa export serves generation, quantized
            info = engine.runner.describe()
            got = [c.token_ids for c in engine.generate(PROMPTS, max_new_tokens=12, temperature=0.0,
                                                        ignore_eos=True)]
        assert info["dtype"] == info["precision"] == dtype and info["kv_cache"].startswith("gqa-v1")
        assert info["quantization"]["method"] == oq.DEFAULT_METHODS[dtype]
        assert info["quantization"]["bits"] == int(dtype[3])
        assert info["weight_bytes_per_step"] < 0.35 * engine.runner.config.model.config.weight_bytes("float32")
        same = sum(a == b for x, y in zip(want, got) for a, b in zip(x, y)) / sum(map(len, want))
        assert share <= same, (dtype, same)
    # Each precision (and the float32 default) has its own cache entry: the key holds the quantization.
    precisions = sorted(json.loads(p.read_text())["precision"] for p in cache.glob("onnx/*/manifest.json"))
    assert precisions == ["int4", "int8"]


def test_async_engine_on_an_int8_export_given_as_the_model(tiny8_gqa, tmp_path):
    """An explicit quantized export runs at its manifest's precision (model.dtype float32 = any)."""
    from mini_engine import Engine
    from mini_engine.async_engine import AsyncEngine
    from mini_engine.sampling import SamplingParams

    out, _ = tiny8_gqa
    engine = Engine(model=str(out), backend="onnxruntime")
    with engine:
        assert engine.continuous and engine.runner.describe()["dtype"] == "int8"
        alone = engine.generate("Hello", max_new_tokens=5, ignore_eos=True)[0].token_ids

        async def main(front):
            async def one(i):
                stream = front.submit("Hello", SamplingParams(max_new_tokens=5, ignore_eos=True))
                return [t async for out in stream for t in out.new_token_ids]
            return await asyncio.gather(*(one(i) for i in range(4)))

        with AsyncEngine(engine) as front:
            got = asyncio.run(main(front))
    assert got == [alone] * 4


def _one_line_error(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("note:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_mismatched_or_corrupted_quantized_exports_are_refused_in_one_line(tiny8_gqa, tmp_path):
    out, _ = tiny8_gqa
    gen = ("generate", "--backend", "onnxruntime", "-n", 2, "Hello")
    line = _one_line_error(run_cli(*gen, "--model", out, "--dtype", "int4"))
    assert "is int8 but model.dtype is int4" in line
    # The manifest claims quantized nodes the graph does not have.
    lying = tmp_path / "lying"
    shutil.copytree(out, lying)
    m = json.loads((lying / "manifest.json").read_text())
    m["quantization"]["quantized_nodes"] = 3
    (lying / "manifest.json").write_text(json.dumps(m))
    line = _one_line_error(run_cli(*gen, "--model", lying))
    assert "does not match its manifest" in line and "the graph has 9" in line
    # A truncated graph.
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    data = (cut / "model.onnx").read_bytes()
    (cut / "model.onnx").write_bytes(data[: len(data) // 2])
    line = _one_line_error(run_cli(*gen, "--model", cut))
    assert "damaged" in line and "model.onnx" in line


def test_int8_where_it_cannot_run_is_one_line(tiny8):
    line = _one_line_error(run_cli("generate", "--backend", "onnxruntime", "--model", "random:tiny", "--dtype",
                                   "int8", "--device", "cuda", "-n", 2, "Hello"))
    assert "int8 on onnxruntime runs on CPU only" in line
    out, _ = tiny8
    # A float32 export given with --dtype int8 is not silently run in float32.
    float_out = out.parent / "float"
    run_cli("export", "onnx", "--model", "random:tiny", "--logits", "last", "--out", float_out, check=True)
    line = _one_line_error(run_cli("generate", "--backend", "onnxruntime", "--model", float_out, "--dtype", "int8",
                                   "-n", 2, "Hello"))
    assert "is float32 but model.dtype is int8" in line and "--quantize int8" in line


@pytest.mark.parametrize("args, message", [
    (("--quantize", "int4", "--quant-method", "dynamic"), "int8 only"),
    (("--quantize", "int8", "--quant-method", "matmulnbits", "--block-size", "24"), "power of two"),
    (("--quantize", "int8", "--block-size", "64"), "matmulnbits only"),
    (("--quantize", "int8", "--fp16"), "exclude each other"),
    (("--block-size", "64",), "need --quantize"),
    (("--quantize", "int8", "--dtype", "int4"), "disagree"),
])
def test_bad_quantize_flags_are_one_line(tmp_path, args, message):
    line = _one_line_error(run_cli("export", "onnx", "--model", "random:tiny", "--out", tmp_path / "x", *args))
    assert message in line


def test_weight_bytes_estimate_matches_the_graph(tiny8):
    from mini_engine.model.source import resolve_model

    out, _ = tiny8
    cfg = resolve_model("random:tiny").config
    got = oq.weight_bytes_per_step(out / "model.onnx")
    assert abs(oq.estimate_weight_bytes(cfg, oq.QuantSpec.make("int8")) - got) < 0.01 * got  # + graph constants


def test_logit_stats():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((10, 100))
    same = oq.logit_stats(ref, ref)
    assert same["rel_err"] == 0 and same["top1"] == 1 and abs(same["kl"]) < 1e-12
    other = oq.logit_stats(rng.standard_normal((10, 100)), ref)
    assert other["rel_err"] > 1.2 and other["top1"] < 0.5


def test_bench_targets_take_a_precision():
    import importlib.util
    from pathlib import Path

    from mini_engine.bench.spec import BenchSpec, Target, parse_targets
    from mini_engine.config import load_config
    from mini_engine.errors import ConfigError

    t = Target.parse("onnxruntime:cpu@int8")
    assert (t.spec, t.backend, t.device, t.dtype) == ("onnxruntime:cpu@int8", "onnxruntime", "cpu", "int8")
    assert Target.parse("torch").dtype is None and Target.parse("torch").spec == "torch:cpu"
    spec = BenchSpec(targets=parse_targets("onnxruntime:cpu,onnxruntime:cpu@int8"), config=load_config().to_dict())
    assert [spec.target_config(x)["model"]["dtype"] for x in spec.targets] == ["float32", "int8"]
    with pytest.raises(ConfigError, match="must be one of"):
        Target.parse("torch:cpu@int3")
    path = Path(__file__).parents[1] / "benchmarks" / "generate_bench.py"
    gb = importlib.util.spec_from_file_location("generate_bench", path)
    mod = importlib.util.module_from_spec(gb)
    gb.loader.exec_module(mod)
    assert mod.parse_target("torch:cpu@int8@gemv=off") == ("torch", "cpu", ["gemv=off"], "int8")
    assert mod.parse_target("onnxruntime:cpu@dtype=int4") == ("onnxruntime", "cpu", [], "int4")
    with pytest.raises(SystemExit):
        mod.parse_target("torch:cpu@int3")
