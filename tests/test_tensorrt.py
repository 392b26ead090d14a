"""TensorRT export and backend.

On CPU: profile computation, plan metadata and its checks, precision-mode
choice, KV row gathering, options and every error path through the real CLI.
On a GPU: the device-memory layer (PyTorch CUDA, pycuda); with TensorRT 10
installed as well, plan building, parity with ONNX Runtime and greedy token
parity with the PyTorch backend.
"""
import json

import numpy as np
import pytest

from conftest import run_cli
from mini_engine.errors import BackendUnavailable, ConfigError, MiniEngineError, ModelNotFound
from mini_engine.model.config import PRESETS
from mini_engine_export.tensorrt_build import BuildOptions, ExportError, keeps_fp32, plan_key, typing_mode
from mini_engine_export.tensorrt_meta import (BuildTarget, build_metadata, check_target, meta_path, read_metadata,
                                              write_metadata)
from mini_engine_export.tensorrt_profiles import (ProfileSettings, compute_profiles, describe_profiles,
                                                  select_profile)
from mini_engine_backends.tensorrt.runner import TensorRTRunner, row_runs

TINY = PRESETS["tiny"]  # 2 layers, 4 heads of 16, 256 positions


def _cuda():
    import torch

    return torch.cuda.is_available()


def _trt_ready():
    return TensorRTRunner.availability().available


gpu = pytest.mark.skipif(not _cuda(), reason="needs a CUDA device visible to PyTorch")
trt_gpu = pytest.mark.skipif(not _trt_ready(), reason=f"needs TensorRT 10 and a CUDA device "
                                                      f"({TensorRTRunner.availability().reason})")


# ----- profiles ------------------------------------------------------------------

def test_context_and_generation_profiles():
    ctx, gen = compute_profiles(TINY, ProfileSettings(max_batch=8, max_seq=128, opt_batch=4))
    assert (ctx.name, gen.name) == ("context", "generation")
    assert ctx.shapes["input_ids"] == ((1, 1), (4, 64), (8, 128))
    assert ctx.shapes["past_key_values.0.key"] == ((1, 4, 0, 16), (4, 4, 0, 16), (8, 4, 0, 16))
    assert gen.shapes["input_ids"] == ((1, 1), (4, 1), (8, 1))
    assert gen.shapes["past_key_values.1.value"] == ((1, 4, 1, 16), (4, 4, 64, 16), (8, 4, 127, 16))
    for p in (ctx, gen):
        assert len(p.shapes) == 3 + 2 * TINY.n_layer
        seq = [s[1] for s in p.shapes["input_ids"]]
        past = [s[2] for s in p.shapes["past_key_values.0.key"]]
        assert [s[1] for s in p.shapes["attention_mask"]] == [a + b for a, b in zip(past, seq)]
        assert p.shapes["position_ids"] == p.shapes["input_ids"]


def test_profiles_round_trip_and_print():
    from mini_engine_export.tensorrt_profiles import Profile

    profiles = compute_profiles(TINY, ProfileSettings(max_batch=2, max_seq=16))
    assert [Profile.from_dict(json.loads(json.dumps(p.to_dict()))) for p in profiles] == profiles
    table = describe_profiles(profiles)
    assert "context" in table and "generation" in table and "2x4x15x16" in table


@pytest.mark.parametrize("settings, message", [
    (ProfileSettings(max_batch=0), "--max-batch"),
    (ProfileSettings(max_seq=300), "--max-seq must be in 2..256"),
    (ProfileSettings(max_batch=4, max_seq=64, opt_batch=5), "--opt-batch"),
])
def test_profile_settings_are_validated(settings, message):
    with pytest.raises(ConfigError, match=message):
        compute_profiles(TINY, settings)


def test_select_profile_per_phase():
    profiles = compute_profiles(TINY, ProfileSettings(max_batch=4, max_seq=64))
    assert select_profile(profiles, 3, 10, 0) == 0
    assert select_profile(profiles, 4, 1, 63) == 1
    with pytest.raises(MiniEngineError, match="fits neither"):
        select_profile(profiles, 2, 5, 3)  # chunked prefill
    with pytest.raises(MiniEngineError, match="rebuild with a larger --max-batch"):
        select_profile(profiles, 5, 1, 3)
    with pytest.raises(MiniEngineError, match="outside the engine's generation profile"):
        select_profile(profiles, 1, 1, 64)


# ----- metadata ------------------------------------------------------------------

HERE = BuildTarget("NVIDIA H100 80GB HBM3", "9.0", "10.3.0")


def _plan(tmp_path, target=HERE):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\0" * 100)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    settings = ProfileSettings(max_batch=4, max_seq=64)
    meta = build_metadata(target=target, plan=plan, plan_sha256="x", onnx=onnx, onnx_sha256="y",
                          model={"spec": "random:tiny", "fingerprint": "f", "config": TINY.to_dict()},
                          precision={"fp16": True, "mode": "weak-fp16"}, settings=settings.__dict__,
                          profiles=[p.to_dict() for p in compute_profiles(TINY, settings)], workspace_gb=4,
                          build_seconds=1.0)
    write_metadata(plan, meta)
    return plan


def test_metadata_round_trip(tmp_path):
    plan = _plan(tmp_path)
    assert meta_path(plan).name == "model.plan.json"
    meta = read_metadata(plan)
    assert meta["gpu"] == {"name": HERE.gpu_name, "compute_capability": "9.0"}
    assert meta["tensorrt_version"] == "10.3.0" and meta["source_onnx"]["sha256"] == "y"
    assert [p["name"] for p in meta["profiles"]] == ["context", "generation"]
    check_target(plan, meta, HERE)  # same GPU and TensorRT: loads


@pytest.mark.parametrize("here, what", [
    (BuildTarget("NVIDIA A100-SXM4-80GB", "8.0", "10.3.0"), "NVIDIA H100 80GB HBM3, compute capability 9.0"),
    (BuildTarget(HERE.gpu_name, "9.0", "10.7.0"), "TensorRT 10.3.0 (here: 10.7.0)"),
])
def test_plan_for_another_gpu_or_tensorrt_is_refused_with_rebuild_command(tmp_path, here, what):
    plan = _plan(tmp_path)
    with pytest.raises(BackendUnavailable) as err:
        check_target(plan, read_metadata(plan), here)
    msg = str(err.value)
    assert what in msg and "rebuild it on this machine" in msg
    assert f"mini-engine export tensorrt --onnx {tmp_path / 'model.onnx'} --out {plan} --fp16" in msg
    assert "--max-batch 4 --max-seq 64" in msg and msg.endswith("--force`")


def test_metadata_problems_are_one_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        read_metadata(tmp_path / "none.plan")
    plan = _plan(tmp_path)
    plan.write_bytes(b"\0" * 50)
    with pytest.raises(ModelNotFound, match="truncated or replaced"):
        read_metadata(plan)
    meta_path(plan).write_text("{not json")
    with pytest.raises(ModelNotFound, match="not valid TensorRT plan metadata"):
        read_metadata(plan)
    meta_path(plan).unlink()
    with pytest.raises(ModelNotFound, match="has no metadata"):
        read_metadata(plan)


# ----- build decisions -----------------------------------------------------------

def test_precision_mode_by_tensorrt_version():
    assert typing_mode("10.3.0", "float32", fp16=False) == "weak-fp32"
    assert typing_mode("10.3.0", "float32", fp16=True) == "weak-fp16"
    assert typing_mode("10.3.0", "float16", fp16=False) == "strong"
    assert typing_mode("11.0.0", "float16", fp16=True) == "strong"
    with pytest.raises(ExportError, match="removed in 11"):
        typing_mode("11.0.0", "float32", fp16=True)
    with pytest.raises(ExportError, match="too old"):
        typing_mode("8.6.1", "float32", fp16=False)


def test_fragile_layers_stay_float32():
    assert keeps_fp32("NORMALIZATION", "/h.0/ln_1/LayerNormalization", ["x"])
    assert keeps_fp32("SOFTMAX", "node_softmax", ["y"])
    assert keeps_fp32("MATRIX_MULTIPLY", "node_linear_48", ["logits"])
    assert not keeps_fp32("MATRIX_MULTIPLY", "/h.0/mlp/c_fc/MatMul", ["z"])


def test_plan_cache_key_changes_with_what_changes_the_engine():
    s = ProfileSettings(max_batch=4, max_seq=64)
    base = plan_key("sha", s, BuildOptions(), HERE)
    assert base == plan_key("sha", s, BuildOptions(), HERE)
    assert len({base, plan_key("sha2", s, BuildOptions(), HERE),
                plan_key("sha", ProfileSettings(max_batch=8, max_seq=64), BuildOptions(), HERE),
                plan_key("sha", s, BuildOptions(fp16=True), HERE),
                plan_key("sha", s, BuildOptions(), BuildTarget(HERE.gpu_name, "9.0", "10.4.0"))}) == 5
    with pytest.raises(ConfigError, match="workspace"):
        BuildOptions(workspace_gb=0)


def test_parity_comparison_and_table():
    from mini_engine_export.tensorrt_parity import compare, format_table

    ref = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 1.0]], np.float32)
    ok = compare("context", "2x1, 0", ref, ref + 0.001, atol=1e-2, min_top1=0.99)
    swapped = compare("generation", "2x1, 1", ref, ref[:, ::-1].copy(), atol=1e-2, min_top1=0.99)
    nan = compare("generation", "2x1, 1", ref, ref * np.nan, atol=1e-2, min_top1=0.0)
    assert ok.passed and ok.top1 == 1.0 and not swapped.passed and not nan.passed
    table = format_table([ok, swapped])
    assert "max |diff| logits" in table and "FAIL" in table.splitlines()[2]


# ----- runner pieces ---------------------------------------------------------------

def test_kv_rows_gathered_in_merged_runs():
    assert row_runs([0, 1, 2, 3], [0, 1, 2, 3]) == [(0, 0, 4)]
    assert row_runs([0, 1, 2, 3, 4], [0, 2, 3]) == [(0, 0, 1), (1, 2, 2)]
    assert row_runs([5, 7, 9], [9, 5]) == [(0, 2, 1), (1, 0, 1)]
    with pytest.raises(MiniEngineError, match="slot 4 has no KV cache"):
        row_runs([0, 1], [0, 4])


def test_options_validate():
    opts = TensorRTRunner.parse_options({"plan": "x.plan", "memory": "torch", "max_batch": 4})
    assert opts.plan == "x.plan" and opts.memory == "torch" and opts.max_batch == 4
    with pytest.raises(ConfigError, match="memory must be one of auto, pycuda, torch"):
        TensorRTRunner.parse_options({"memory": "cupy"})
    with pytest.raises(ConfigError, match="unknown config key 'backend.options.engine'"):
        TensorRTRunner.parse_options({"engine": "x"})


def test_availability_names_what_is_missing():
    from mini_engine.devices import cuda_unavailable_reason, module_installed

    avail = TensorRTRunner.availability()
    if not module_installed("tensorrt"):
        assert not avail.available and "TensorRT is not installed" in avail.reason
        assert "tensorrt>=10,<11" in avail.reason
    if cuda_unavailable_reason():
        assert not avail.available and "no CUDA device" in avail.reason


# ----- CLI error paths (real subprocess) ----------------------------------------------

def _one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ")
    for f in fragments:
        assert f in last, last
    return last


@pytest.mark.skipif(_trt_ready(), reason="TensorRT can run here")
def test_cli_without_tensorrt_fails_in_one_line(tmp_path):
    proc = run_cli("backends")
    row = next(line for line in proc.stdout.splitlines() if line.startswith("tensorrt"))
    assert " no " in row and TensorRTRunner.availability().reason in row
    _one_line_error(run_cli("export", "tensorrt", "--model", "random:tiny", "--out", tmp_path / "m.plan"),
                    "cannot build a TensorRT engine here")
    _one_line_error(run_cli("generate", "--backend", "tensorrt", "--device", "cuda", "--model", "random:tiny", "Hi"),
                    "backend 'tensorrt' is unavailable")
    _one_line_error(run_cli("generate", "--backend", "tensorrt", "--model", "random:tiny", "Hi"),
                    "does not support device 'cpu'")


def test_last_position_export_is_refused_for_tensorrt(tiny_last_export, tmp_path):
    from mini_engine.model.source import resolve_model
    from mini_engine_export.tensorrt_cache import onnx_for

    with pytest.raises(ConfigError, match="--logits all"):
        onnx_for(resolve_model(str(tiny_last_export[0])), "float32", tmp_path)


def test_cli_bad_export_flags_fail_in_one_line(tmp_path):
    plan = tmp_path / "m.plan"
    _one_line_error(run_cli("export", "tensorrt", "--model", "random:tiny", "--onnx", tmp_path, "--out", plan),
                    "not both")
    _one_line_error(run_cli("export", "tensorrt", "--model", "random:tiny", "--max-seq", 300, "--out", plan),
                    "--max-seq must be in 2..256")
    _one_line_error(run_cli("export", "tensorrt", "--model", "random:tiny", "--max-batch", 2, "--opt-batch", 4,
                            "--out", plan), "--opt-batch")
    _one_line_error(run_cli("export", "tensorrt", "--onnx", tmp_path / "missing.onnx", "--out", plan),
                    "does not exist")
    plan.write_bytes(b"old")
    _one_line_error(run_cli("export", "tensorrt", "--model", "random:tiny", "--out", plan), "pass --force")
    cfg = tmp_path / "trt.toml"
    cfg.write_text('[backend]\nname = "tensorrt"\ndevice = "cuda"\n[backend.options]\nmemory = "cupy"\n')
    _one_line_error(run_cli("export", "tensorrt", "--config", cfg, "--model", "random:tiny", "--out", plan,
                            "--force"), "backend.options.memory")


# ----- on a GPU ----------------------------------------------------------------------

def _memories():
    from mini_engine.devices import module_installed

    return ["torch"] + (["pycuda"] if module_installed("pycuda") else [])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", _memories())
def test_device_memory_round_trip(kind):
    from mini_engine_backends.tensorrt.memory import make_memory

    mem = make_memory(kind, 0)
    try:
        a, b = mem.alloc(64), mem.alloc(64)
        host = np.arange(16, dtype=np.float32)
        mem.upload(a, host)
        mem.copy(b, 32, a, 0, 32)  # first 8 floats of a -> second half of b
        mem.copy(b, 0, a, 32, 32)  # last 8 floats of a -> first half of b
        out = mem.host_empty((16,), np.float32)
        mem.download(out, b)
        mem.synchronize()
        np.testing.assert_array_equal(out, np.concatenate([host[8:], host[:8]]))
        half = mem.host_empty((4,), np.float32)
        mem.download(half, a, offset=16)
        mem.synchronize()
        np.testing.assert_array_equal(half, host[4:8])
    finally:
        mem.close()


@pytest.mark.gpu
@trt_gpu
@pytest.mark.parametrize("fp16", [False, True])
def test_export_tensorrt_cli_builds_plan_that_passes_parity(tmp_path, fp16):
    plan = tmp_path / "tiny.plan"
    args = ["export", "tensorrt", "--model", "random:tiny", "--out", plan, "--max-batch", 4, "--max-seq", 64]
    proc = run_cli(*args, *(["--fp16"] if fp16 else []), env={"MINI_ENGINE_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "context" in proc.stderr and "generation" in proc.stderr and "top-1 agree" in proc.stderr
    meta = json.loads(meta_path(plan).read_text())
    assert meta["precision"]["fp16"] == fp16 and meta["settings"]["max_batch"] == 4


@pytest.mark.gpu
@trt_gpu
def test_tensorrt_greedy_tokens_equal_torch(tmp_path, monkeypatch):
    from mini_engine import Engine

    monkeypatch.setenv("MINI_ENGINE_CACHE", str(tmp_path))
    prompts = ["Hello world", "The quick brown fox jumps over the lazy dog", "A"]
    tokens = {}
    for backend, opts in (("torch", {}), ("tensorrt", {"max_batch": 4, "max_seq": 64})):
        with Engine(model="random:tiny", backend=backend, device="cuda", **opts) as engine:
            tokens[backend] = [c.token_ids for c in engine.generate(prompts, max_new_tokens=16, ignore_eos=True)]
    assert tokens["tensorrt"] == tokens["torch"]
