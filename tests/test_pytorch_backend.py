"""The torch backend's CPU thread budget: `threads` bounds torch and the GEMV path's BLAS pool."""
import re

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from mini_engine.model.source import resolve_model
from mini_engine.runner import RunnerConfig, StepInput
from mini_engine_backends.pytorch import TorchRunner


def blas_threads() -> set[int]:
    return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}


def test_threads_option_caps_torch_and_blas_and_close_restores_them():
    torch_before, blas_before = torch.get_num_threads(), blas_threads()
    assert blas_before, "numpy's BLAS should be visible to threadpoolctl"
    with TorchRunner(RunnerConfig(model=resolve_model("random:tiny"), options={"threads": 1})) as r:
        assert r.describe()["gemv"] == "blas"
        assert torch.get_num_threads() == 1 and blas_threads() == {1}
        r.allocate_kv(1, 4)
        r.execute(StepInput(np.array([[5, 6, 7]]), np.arange(3)[None], np.ones((1, 3), np.int64), [0], 0))
        out = r.execute(StepInput(np.array([[8]]), np.array([[3]]), np.ones((1, 4), np.int64), [0], 3))
        assert out.shape == (1, 50257) and np.isfinite(out).all()
        assert torch.get_num_threads() == 1  # a single-row step keeps the configured count
    assert torch.get_num_threads() == torch_before and blas_threads() == blas_before


def test_single_row_steps_run_no_torch_ops():
    """Batch-1 decode takes the numpy path whole (two thread pools on two cores fight otherwise)."""
    from torch.profiler import profile

    with TorchRunner(RunnerConfig(model=resolve_model("random:tiny"))) as r:
        r.allocate_kv(1, 4)
        r.execute(StepInput(np.array([[5, 6, 7]]), np.arange(3)[None], np.ones((1, 3), np.int64), [0], 0))
        with profile() as prof:
            r.execute(StepInput(np.array([[8]]), np.array([[3]]), np.ones((1, 4), np.int64), [0], 3))
        assert [e.name for e in prof.events()] == []


def test_out_of_range_ids_are_refused_before_any_backend_code():
    import pytest

    from mini_engine.errors import MiniEngineError

    with TorchRunner(RunnerConfig(model=resolve_model("random:tiny"))) as r:
        r.allocate_kv(1, 4)
        with pytest.raises(MiniEngineError, match=r"token ids must be in 0\.\.50256"):
            r.execute(StepInput(np.array([[50257]]), np.array([[0]]), np.ones((1, 1), np.int64), [0], 0))
        with pytest.raises(MiniEngineError, match=r"token ids must be in"):
            r.execute(StepInput(np.array([[-1]]), np.array([[0]]), np.ones((1, 1), np.int64), [0], 0))
        with pytest.raises(MiniEngineError, match=r"position ids must be in 0\.\."):
            r.execute(StepInput(np.array([[5]]), np.array([[5000]]), np.ones((1, 1), np.int64), [0], 0))


@pytest.mark.parametrize("options,dtype,message", [
    ({"paged_attention": "numba"}, "float32", "paged_attention must be auto, kernel or torch, got 'numba'"),
    ({"paged_attention": "kernel"}, "bfloat16", "'kernel' is the CPU float32-KV kernel, not bfloat16 on cpu"),
    ({"paged_attention": "torch", "tensor_parallel_size": 2}, "float32", "tensor parallel ranks read the KV pool"),
])
def test_paged_attention_option_is_checked_in_one_line(options, dtype, message):
    from mini_engine.errors import ConfigError
    from mini_engine.model.source import resolve_model
    from mini_engine.runner import RunnerConfig
    from mini_engine_backends.pytorch import TorchRunner

    with pytest.raises(ConfigError, match=re.escape(message)):
        TorchRunner(RunnerConfig(model=resolve_model("random:tiny"), dtype=dtype, options=options)).load()


def test_onednn_row_buckets_are_few_and_exact():
    """Row counts past EXACT_ROWS are padded to at most 1/16 more, so a server meets a bounded set
    of GEMM shapes whatever its traffic; the padded rows change no real row's output."""
    import torch

    from mini_engine_backends.pytorch.linears import EXACT_ROWS, CpuLinear, bucket_rows, onednn_usable

    buckets = [bucket_rows(m) for m in range(1, 2049)]
    assert all(m <= b <= m + max(1, m // 16) for m, b in zip(range(1, 2049), buckets))
    assert buckets[:EXACT_ROWS] == list(range(1, EXACT_ROWS + 1)) and len(set(buckets)) == 144
    if not onednn_usable():
        pytest.skip("no oneDNN linear in this torch build")
    torch.manual_seed(0)
    w, b = torch.randn(48, 32), torch.randn(48)
    lin = CpuLinear(w, b)
    for m in (1, 64, 65, 100, 131):
        x = torch.randn(1, m, 32)
        assert torch.allclose(lin(x), torch.nn.functional.linear(x, w, b), atol=1e-4), m


def test_kv_pool_is_resident_from_the_start():
    """The kernel's pool is written at allocation: resident memory is its size at once, not a growth
    with every new block that traffic reaches (which reads as a leak)."""
    import psutil

    from mini_engine_backends.pytorch.paged_attention import allocate_pool

    proc = psutil.Process()
    before = proc.memory_info().rss
    keys, values = allocate_pool(2, 64, 4, 128, 64)  # 2 layers x K,V x 8 MiB
    grown = (proc.memory_info().rss - before) / 2**20
    assert grown >= 0.9 * 32, grown
    del keys, values
