"""CUDA-graph decode of the PyTorch backend: bucket logic on CPU, parity with eager on a GPU."""
import numpy as np
import pytest
import torch

from mini_engine.errors import ConfigError

from conftest import run_cli

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device visible to PyTorch")


def test_buckets_are_1_2_4_8_then_steps_of_8():
    from mini_engine_backends.pytorch.cuda_graphs import graph_buckets

    assert graph_buckets(1) == (1,)
    assert graph_buckets(8) == (1, 2, 4, 8)
    assert graph_buckets(32) == (1, 2, 4, 8, 16, 24, 32)
    assert graph_buckets(20) == (1, 2, 4, 8, 16, 20)
    assert graph_buckets(3) == (1, 2, 3)


def test_smallest_bucket_that_fits():
    from mini_engine_backends.pytorch.cuda_graphs import bucket_for, graph_buckets

    buckets = graph_buckets(32)
    assert [bucket_for(n, buckets) for n in (1, 2, 3, 5, 8, 9, 17, 32)] == [1, 2, 4, 8, 8, 16, 24, 32]
    assert bucket_for(33, buckets) is None  # larger batches run eagerly


def test_options_validate():
    from mini_engine_backends.pytorch import TorchRunner

    opts = TorchRunner.parse_options({"enforce_eager": True, "cuda_graph_max_batch": 16})
    assert opts.enforce_eager and opts.cuda_graph_max_batch == 16
    with pytest.raises(ConfigError, match="cuda_graph_max_batch"):
        TorchRunner.parse_options({"cuda_graph_max_batch": 0})
    with pytest.raises(ConfigError, match="enforce_eager"):
        TorchRunner.parse_options({"enforce_eager": "yes"})


def test_cli_rejects_bad_graph_option_in_one_line():
    proc = run_cli("generate", "--model", "random:tiny", "--set", "backend.options.cuda_graph_max_batch=0", "Hi")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: backend.options.cuda_graph_max_batch")
    assert "Traceback" not in proc.stderr


def test_cpu_runner_never_captures():
    from mini_engine import Engine

    with Engine(model="random:tiny") as engine:
        engine.generate("Hello", max_new_tokens=3)
        assert engine.runner.graphs is None
        assert engine.runner.describe()["cuda_graphs"] is None


# ----- on a GPU ------------------------------------------------------------------

def _runner(model, dtype, eager):
    from mini_engine.model.source import resolve_model
    from mini_engine.runner import RunnerConfig
    from mini_engine_backends.pytorch import TorchRunner

    return TorchRunner(RunnerConfig(resolve_model(model), "cuda", dtype, {"enforce_eager": eager})).load()


@pytest.mark.gpu
@gpu
def test_graph_decode_logits_match_eager_with_shrinking_active_set():
    from mini_engine.runner import StepInput

    rng = np.random.default_rng(0)
    runners = [_runner("random:tiny", "float32", eager) for eager in (True, False)]
    b, prompt, max_len = 5, 6, 24
    for r in runners:
        r.allocate_kv(b, max_len)
    ids = rng.integers(0, 50000, (b, prompt))
    mask = np.ones((b, prompt), dtype=np.int64)
    mask[1, :2] = 0  # a left-padded row
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    step = StepInput(ids, pos, mask, list(range(b)), 0)
    outs = [r.execute(step) for r in runners]
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)
    # Active rows shrink (3 -> bucket 4, then 1): padding rows must not disturb other slots.
    for active in ([0, 1, 2, 3, 4], [0, 2, 3], [0, 2, 3], [2], [2]):
        past = mask.shape[1]
        mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], 1)
        new = rng.integers(0, 50000, (len(active), 1))
        p = pos[active, -1:] + 1 + (past - prompt)
        step = StepInput(new, p, mask[active], active, past)
        outs = [r.execute(step) for r in runners]
        np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)
    graphs = runners[1].graphs.describe()
    assert graphs["captured"] == [1, 4, 8] and graphs["replays"] == 5
    assert runners[0].graphs is None


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_graph_greedy_tokens_equal_eager(dtype):
    from mini_engine import Engine

    prompts = ["Hello world", "The quick brown fox jumps over the lazy dog", "A"]
    tokens = {}
    for eager in (True, False):
        with Engine(model="random:gpt2", backend="torch", device="cuda", dtype=dtype,
                    enforce_eager=eager) as engine:
            tokens[eager] = [c.token_ids for c in engine.generate(prompts, max_new_tokens=24, ignore_eos=True)]
            if not eager:
                assert engine.runner.graphs.describe()["replays"] == 23
    assert tokens[True] == tokens[False]
