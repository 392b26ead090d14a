import pytest

from mini_engine import load_config
from mini_engine.errors import ConfigError


def test_defaults_and_shipped_configs():
    cfg = load_config()
    assert cfg.backend.name == "torch" and cfg.model.source == "random:gpt2"
    cpu = load_config("configs/cpu.toml")
    assert cpu.backend.device == "cpu" and cpu.batching.max_batch_size == 16
    gpu = load_config("configs/gpu.toml")
    assert gpu.backend.device == "cuda" and gpu.model.dtype == "float16"


def test_precedence_file_then_set_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[backend]\nname = "onnxruntime"\n[generation]\nmax_new_tokens = 5\n')
    cfg = load_config(f, ["generation.max_new_tokens=7", "backend.options.threads=2", 'generation.stop=["\\n"]'],
                      **{"backend.name": "torch", "model.source": None})
    assert cfg.backend.name == "torch"
    assert cfg.generation.max_new_tokens == 7
    assert cfg.backend.options == {"threads": 2}
    assert cfg.generation.stop == ["\n"]


@pytest.mark.parametrize("raw, message", [
    ({"modle": {}}, "unknown config key 'modle'"),
    ({"batching": {"max_batch_size": "8"}}, "'batching.max_batch_size' expects an integer"),
    ({"batching": {"max_batch_size": 0}}, "max_batch_size must be >= 1"),
    ({"generation": {"temperature": "hot"}}, "'generation.temperature' expects a number"),
    ({"generation": {"top_p": 1.5}}, "top_p must be in (0, 1]"),
    ({"batching": {"preserve_ordering": 1}}, "expects true or false"),
    ({"batching": {"preferred_batch_sizes": [4, 64]}}, "preferred_batch_sizes"),
    ({"model": {"dtype": "int3"}}, "model.dtype"),
    ({"model": "gpt2"}, "model must be a table"),
])
def test_bad_config_is_one_clear_error(raw, message):
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_invalid_toml_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[model\nsource=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f)


def test_backend_options_validated_by_backend():
    from mini_engine.model.source import resolve_model
    from mini_engine.runner import RunnerConfig
    from mini_engine_backends.pytorch import TorchRunner

    with pytest.raises(ConfigError, match=r"unknown config key 'backend.options.turbo'"):
        TorchRunner(RunnerConfig(model=resolve_model("random:tiny"), options={"turbo": True}))
    with pytest.raises(ConfigError, match="linear must be"):
        TorchRunner(RunnerConfig(model=resolve_model("random:tiny"), options={"linear": "fast"}))
    with pytest.raises(ConfigError, match="gemv must be"):
        TorchRunner(RunnerConfig(model=resolve_model("random:tiny"), options={"gemv": "mkl"}))
    runner = TorchRunner(RunnerConfig(model=resolve_model("random:tiny"), dtype="bfloat16", options={"gemv": "blas"}))
    with pytest.raises(ConfigError, match="gemv = 'blas' needs device cpu and dtype float32"):
        runner.load()


# ----- per-backend option tables: swapping the backend is one line ---------------------------
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _runnable_here() -> list[str]:
    from mini_engine.registry import list_backends

    return [i.name for i in list_backends() if i.available and "cpu" in i.devices]


def test_only_the_selected_backends_table_applies():
    cpu = load_config(REPO / "configs/cpu.toml")
    assert cpu.backend.options == {"threads": 0}
    ort = load_config(REPO / "configs/cpu.toml", **{"backend.name": "onnxruntime"})
    assert ort.backend.options == {"intra_op_threads": 0}
    # A flat key is the selected backend's and wins over its table (how --set overrides a file).
    cfg = load_config(REPO / "configs/cpu.toml", ["backend.options.threads=2"])
    assert cfg.backend.options == {"threads": 2}
    # The written form survives a round trip, so a backend chosen afterwards gets its own table.
    again = load_config(cpu.to_dict(), **{"backend.name": "onnxruntime"})
    assert again.backend.options == {"intra_op_threads": 0}
    assert cpu.backend.options_for("onnxruntime") == {"intra_op_threads": 0}


@pytest.mark.parametrize("raw, message", [
    ({"backend": {"name": "onnxruntime", "options": {"threads": 2}}},
     "unknown config key 'backend.options.threads' for backend 'onnxruntime'"),
    ({"backend": {"name": "onnxruntime", "options": {"threads": 2, "torch": {"threads": 1}}}},
     "it is in [backend.options.torch], which applies when backend.name is 'torch'"),
    ({"backend": {"options": {"torch": {"turbo": True}}}}, "unknown config key 'backend.options.torch.turbo'"),
    ({"backend": {"options": {"torch": {"threads": "many"}}}}, "'backend.options.torch.threads' expects an integer"),
    ({"backend": {"options": {"onnxruntme": {"intra_op_threads": 1}}}}, "'backend.options.onnxruntme'"),
])
def test_selected_backends_bad_options_are_one_clear_error(raw, message):
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_other_backends_tables_are_not_applied_or_validated_by_the_selected_one():
    cfg = load_config({"backend": {"name": "torch", "options": {"onnxruntime": {"anything": 1}}}})
    assert cfg.backend.options == {}


def test_gpu_config_validates_for_each_of_its_backends():
    from mini_engine.model.source import resolve_model
    from mini_engine.registry import get_backend
    from mini_engine.runner import RunnerConfig

    for name in ("torch", "onnxruntime", "tensorrt"):
        cfg = load_config(REPO / "configs/gpu.toml", **{"backend.name": name})
        # Constructing a runner checks the device and the options; nothing is loaded.
        get_backend(name)(RunnerConfig(model=resolve_model(cfg.model.source), device=cfg.backend.device,
                                       dtype=cfg.model.dtype, options=cfg.backend.options))


def test_bench_targets_get_their_own_table():
    from mini_engine.bench.spec import BenchSpec, Target, resolve_config

    config = resolve_config(str(REPO / "configs/cpu.toml"), ("backend.options.threads=1",), None, None)
    spec = BenchSpec(targets=[Target.parse("torch:cpu"), Target.parse("onnxruntime:cpu")], config=config,
                     options={"onnxruntime": {"inter_op_threads": 1}})
    torch_cfg = load_config(spec.target_config(spec.targets[0]))
    ort_cfg = load_config(spec.target_config(spec.targets[1]))
    assert torch_cfg.backend.options == {"threads": 1}
    assert ort_cfg.backend.options == {"intra_op_threads": 0, "inter_op_threads": 1}


@pytest.fixture(scope="module")
def ort_cache(tmp_path_factory):
    """One export cache for this module's onnxruntime runs (random:tiny is exported once)."""
    return {"MINI_ENGINE_CACHE": str(tmp_path_factory.mktemp("cache"))}


@pytest.mark.parametrize("how", ["edited copy", "--backend", "--set backend.name"])
@pytest.mark.parametrize("backend", _runnable_here())
def test_shipped_cpu_config_runs_every_backend_with_one_change(backend, how, tmp_path, ort_cache):
    from conftest import run_cli

    shipped = REPO / "configs/cpu.toml"
    if how == "edited copy":
        text = shipped.read_text()
        assert text.count('name = "torch"') == 1
        copy = tmp_path / "copy.toml"
        copy.write_text(text.replace('name = "torch"', f'name = "{backend}"'))
        args = ["--config", copy]
    elif how == "--backend":
        args = ["--config", shipped, "--backend", backend]
    else:
        args = ["--config", shipped, "--set", f"backend.name={backend}"]
    proc = run_cli("generate", *args, "--model", "random:tiny", "-n", 2, "--json", "Hi", env=ort_cache)
    assert proc.returncode == 0, proc.stderr
    assert __import__("json").loads(proc.stdout)["backend"] == backend
