"""The onnxruntime backend: a real ONNX Runtime session against the PyTorch backend, and its error lines."""
import json
import shutil

import numpy as np
import pytest

from conftest import run_cli
from mini_engine.devices import cuda_unavailable_reason

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy", "A", "In 1492,"]


@pytest.fixture(scope="session")
def hf_export(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort") / "hf"
    run_cli("export", "onnx", "--model", hf_dir, "--out", out, "--no-validate", check=True)
    return out


@pytest.fixture(scope="session")
def ort_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mini-engine-cache")


def test_batched_left_padded_greedy_equals_torch(hf_dir, hf_export):
    """Token for token, batched and left-padded; EOS on one row makes the runner drop rows mid-batch."""
    from mini_engine import Engine

    with Engine(model=str(hf_dir), backend="torch") as torch_engine:
        ref = torch_engine.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
        # Pretend a token that row 2 emits early is <|endoftext|>, so rows finish at different steps.
        eos = ref[2].token_ids[3]
        torch_engine.tokenizer.eos_token_id = eos
        ref_eos = torch_engine.generate(PROMPTS, max_new_tokens=16)
    with Engine(model=str(hf_export), backend="onnxruntime") as ort_engine:
        got = ort_engine.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
        ort_engine.tokenizer.eos_token_id = eos
        got_eos = ort_engine.generate(PROMPTS, max_new_tokens=16)
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    assert [c.token_ids for c in got_eos] == [c.token_ids for c in ref_eos]
    assert len({len(c.token_ids) for c in got_eos}) > 1  # rows really finished at different steps


def test_runner_slot_subsets_match_torch(hf_dir, hf_export):
    """Runner-level: prefill 3 slots, then decode subsets in a new order; logits equal torch's."""
    from mini_engine.model.source import resolve_model
    from mini_engine.registry import get_backend
    from mini_engine.runner import RunnerConfig, StepInput

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, (3, 5))
    mask = np.ones((3, 5), dtype=np.int64)
    mask[1, :2] = 0
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    steps = [StepInput(ids, pos, mask, [0, 1, 2], 0, logits="all")]
    for slots in ([0, 1, 2], [2, 0], [2, 0], [0]):
        past = steps[-1].past_len + steps[-1].seq_len
        n = len(slots)
        steps.append(StepInput(rng.integers(0, 50257, (n, 1)), np.full((n, 1), past), np.ones((n, past + 1),
                                                                                              dtype=np.int64),
                               slots, past))
    outs = {}
    for name, model in (("torch", hf_dir), ("onnxruntime", hf_export)):
        with get_backend(name)(RunnerConfig(model=resolve_model(str(model)))) as runner:
            runner.allocate_kv(3, 16)
            outs[name] = [runner.execute(s) for s in steps]
    for a, b in zip(outs["torch"], outs["onnxruntime"]):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_any_model_spec_is_exported_on_first_use(ort_cache):
    from mini_engine import Engine

    with Engine(model="random:tiny", backend="onnxruntime", cache_dir=str(ort_cache)) as engine:
        a = engine.generate("Hello", max_new_tokens=6, ignore_eos=True)[0]
        info = engine.runner.describe()
    manifests = list(ort_cache.glob("onnx/*/manifest.json"))
    assert len(manifests) == 1 and json.loads(manifests[0].read_text())["validation"]["passed"]
    assert info["onnx"].startswith(str(ort_cache)) and info["providers"] == ["CPUExecutionProvider"]
    assert info["spinning"] is False  # torch was imported in this process (by the export)
    with Engine(model="random:tiny", backend="torch") as engine:
        assert engine.generate("Hello", max_new_tokens=6, ignore_eos=True)[0].token_ids == a.token_ids
    # A second process finds the cached export instead of exporting again.
    proc = run_cli("generate", "--backend", "onnxruntime", "--model", "random:tiny", "-n", 6, "--ignore-eos",
                   "--json", "--set", f'backend.options.cache_dir="{ort_cache}"', "Hello", check=True)
    assert json.loads(proc.stdout)["token_ids"] == a.token_ids and "reusing the export" in proc.stderr


def test_first_use_export_says_once_where_it_went_and_how_to_clear_it(tmp_path):
    env = {"MINI_ENGINE_CACHE": str(tmp_path / "cache")}
    args = ("generate", "--backend", "onnxruntime", "--model", "random:tiny", "-n", 2, "Hello")
    first = run_cli(*args, env=env, check=True).stderr
    (entry,) = (tmp_path / "cache" / "onnx").iterdir()
    assert f"cached the export" in first and str(entry) in first
    assert f"rm -rf {tmp_path / 'cache' / 'onnx'}" in first and "MINI_ENGINE_CACHE" in first
    again = run_cli(*args, env=env, check=True).stderr
    # generate has no --force: the reuse line names what does re-export.
    assert f"reusing the export in {entry}" in again and "delete that directory" in again
    assert "--force" not in again and "cached the export" not in again


def test_export_of_a_random_model_gets_the_random_weights_note(tiny_last_export):
    out, _ = tiny_last_export
    proc = run_cli("generate", "--backend", "onnxruntime", "--model", out, "-n", 2, "Hello", check=True)
    assert f"note: {out} is an export of random:tiny, which has seeded random weights" in proc.stderr


def test_last_position_export_generates_like_torch_and_refuses_all_logits(tiny_last_export):
    from mini_engine import Engine
    from mini_engine.errors import MiniEngineError
    from mini_engine.runner import StepInput

    out, _ = tiny_last_export
    with Engine(model="random:tiny", backend="torch") as engine:
        ref = engine.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    with Engine(model=str(out), backend="onnxruntime") as engine:
        got = engine.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
        ids = np.array([[15496, 995, 11]])
        runner = engine.runner
        runner.allocate_kv(1, 8)
        with pytest.raises(MiniEngineError, match="--logits all"):
            runner.execute(StepInput(ids, np.arange(3)[None], np.ones((1, 3), np.int64), [0], 0, logits="all"))
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]


def test_onnx_file_path_and_options(hf_export):
    proc = run_cli("generate", "--backend", "onnxruntime", "--model", hf_export / "model.onnx", "-n", 4, "--json",
                   "--set", "backend.options.intra_op_threads=1", "--set", "backend.options.allow_spinning=off",
                   "--set", 'backend.options.graph_optimization_level="basic"', "Hello", check=True)
    assert len(json.loads(proc.stdout)["token_ids"]) >= 1


def one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def broken_copy(hf_export, tmp_path, how):
    out = tmp_path / "broken"
    shutil.copytree(hf_export, out)
    model = out / "model.onnx"
    if how == "missing":
        model.unlink()
    elif how == "truncated":
        data = model.read_bytes()
        model.write_bytes(data[: len(data) // 2])
    elif how == "not-onnx":  # same size, so only ONNX Runtime can tell
        model.write_bytes(b"this is not an onnx model\n" * (model.stat().st_size // 26)
                          + b"x" * (model.stat().st_size % 26))
    elif how == "manifest":
        m = json.loads((out / "manifest.json").read_text())
        m["io"]["inputs"] = m["io"]["inputs"][:3]
        (out / "manifest.json").write_text(json.dumps(m))
    return out


@pytest.mark.parametrize("how, needles", [
    ("missing", ["model.onnx is missing", "--force"]),
    ("truncated", ["truncated"]),
    ("not-onnx", ["not a valid ONNX model"]),
    ("manifest", ["does not match model.onnx"]),
])
def test_damaged_exports_are_one_line_errors(hf_export, tmp_path, how, needles):
    out = broken_copy(hf_export, tmp_path, how)
    one_line_error(run_cli("generate", "--backend", "onnxruntime", "--model", out, "-n", 2, "Hello"), *needles)


def test_other_bad_inputs_are_one_line_errors(hf_export, tmp_path):
    (tmp_path / "lonely.onnx").write_bytes((hf_export / "model.onnx").read_bytes()[:100])
    one_line_error(run_cli("generate", "-b", "onnxruntime", "-m", tmp_path / "lonely.onnx", "Hi"), "no manifest.json")
    one_line_error(run_cli("generate", "-b", "onnxruntime", "-m", tmp_path / "nope.onnx", "Hi"), "does not exist")
    one_line_error(run_cli("generate", "-b", "torch", "-m", hf_export, "Hi"), "is an ONNX export")
    # An export of one model used with another model.source.
    one_line_error(run_cli("generate", "-b", "onnxruntime", "-m", "random:tiny", "--set",
                           f'backend.options.onnx_path="{hf_export}"', "Hi"), "different model")
    one_line_error(run_cli("generate", "-b", "onnxruntime", "-m", hf_export, "--set",
                           "backend.options.graph_optimization_level=max", "Hi"), "graph_optimization_level")


@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="this machine has a GPU; the missing-provider "
                                                              "error is checked on CPU-only machines")
def test_provider_not_installed(hf_export):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    one_line_error(run_cli("generate", "-b", "onnxruntime", "-m", hf_export, "--set",
                           'backend.options.providers=["TensorrtExecutionProvider"]', "Hi"),
                   "TensorrtExecutionProvider is not installed", "onnxruntime-gpu")
    one_line_error(run_cli("generate", "-b", "onnxruntime", "-m", hf_export, "--set",
                           'backend.options.providers=["NopeExecutionProvider"]', "Hi"),
                   "unknown execution provider")


def _cuda_ep_reason():
    reason = cuda_unavailable_reason()
    if reason:
        return reason
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "onnxruntime-gpu (CUDAExecutionProvider) is not installed"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_ep_reason() is not None, reason=f"needs CUDA ONNX Runtime: {_cuda_ep_reason()}")
def test_cuda_io_binding_greedy_equals_torch(hf_dir, hf_export):
    from mini_engine import Engine

    with Engine(model=str(hf_dir), backend="torch") as engine:
        ref = engine.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    with Engine(model=str(hf_export), backend="onnxruntime", device="cuda") as engine:
        got = engine.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
        assert engine.runner.describe()["providers"][0] == "CUDAExecutionProvider"
        assert engine.runner.past[0].device_name() == "cuda"  # the cache stayed on the device
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]


def test_prefill_groups_keep_padding_small_and_every_row_within_capacity():
    import numpy as np

    from mini_engine_backends.onnxruntime.paged_slots import prefill_groups

    slots = np.array([0, 1, 2, 3])
    n_new = np.array([80, 80, 80, 200])
    slot_len = np.zeros(8, np.int64)
    groups = [g.tolist() for g in prefill_groups(np.array([0, 1, 2, 3]), slots, n_new, slot_len, 1024)]
    assert groups == [[0, 1, 2], [3]]  # 200 beside three 80s would be mostly padding
    # A row in the range (decoding at 960 cached tokens) cannot take an 80-token padded chunk.
    slots = np.array([0, 2])
    slot_len[1] = 960
    groups = [g.tolist() for g in prefill_groups(np.array([0, 1]), slots, np.array([80, 80]), slot_len, 1024)]
    assert groups == [[0], [1]]
