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
    ({"model": {"dtype": "int4"}}, "model.dtype"),
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
