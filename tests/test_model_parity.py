"""Logits parity of the engine's GPT-2 forward (via the torch runner) with transformers."""
import numpy as np
import pytest
import torch

from mini_engine.model.source import resolve_model
from mini_engine.runner import RunnerConfig, StepInput
from mini_engine_backends.pytorch import TorchRunner

ATOL = 1e-4


@pytest.fixture(params=[{"linear": "onednn"}, {"linear": "aten"}, {"linear": "onednn", "gemv": "off"}],
                ids=["onednn+gemv", "aten+gemv", "onednn"])
def runner(request, hf_dir):
    r = TorchRunner(RunnerConfig(model=resolve_model(str(hf_dir)), options=request.param))
    with r:
        yield r


def hf_logits(hf_model, ids, mask):
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    with torch.no_grad():
        return hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        position_ids=torch.from_numpy(pos)).logits.numpy()


def test_full_prompt_logits(runner, hf_model):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, (1, 12))
    mask = np.ones_like(ids)
    runner.allocate_kv(1, 12)
    ours = runner.execute(StepInput(ids, np.arange(12)[None], mask, [0], 0, logits="all"))
    assert np.abs(ours - hf_logits(hf_model, ids, mask)).max() <= ATOL


def test_one_token_prompt(runner, hf_model):
    """A one-token prompt is a single-row step with an empty cache."""
    ids = np.array([[15496]])
    runner.allocate_kv(1, 4)
    ours = runner.execute(StepInput(ids, np.zeros((1, 1), np.int64), np.ones((1, 1), np.int64), [0], 0, logits="all"))
    assert ours.shape == (1, 1, 50257)
    assert np.abs(ours - hf_logits(hf_model, ids, np.ones_like(ids))).max() <= ATOL


def test_step_by_step_kv_cache(runner, hf_model):
    """Prefill 5 tokens, then decode one at a time; each step matches a full forward."""
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50257, (2, 11))
    ref = hf_logits(hf_model, ids, np.ones_like(ids))
    runner.allocate_kv(2, 11)
    out = runner.execute(StepInput(ids[:, :5], np.tile(np.arange(5), (2, 1)), np.ones((2, 5), np.int64), [0, 1], 0))
    assert np.abs(out - ref[:, 4]).max() <= ATOL
    for t in range(5, 11):
        out = runner.execute(StepInput(ids[:, t:t + 1], np.full((2, 1), t), np.ones((2, t + 1), np.int64), [0, 1], t))
        assert np.abs(out - ref[:, t]).max() <= ATOL


def test_single_row_decode(runner, hf_model):
    """Batch-1 decode steps take the numpy/BLAS row path where enabled; logits match all the same."""
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50257, (1, 9))
    ref = hf_logits(hf_model, ids, np.ones_like(ids))
    runner.allocate_kv(1, 9)
    threads = torch.get_num_threads()
    runner.execute(StepInput(ids[:, :4], np.arange(4)[None], np.ones((1, 4), np.int64), [0], 0))
    for t in range(4, 9):
        out = runner.execute(StepInput(ids[:, t:t + 1], np.full((1, 1), t), np.ones((1, t + 1), np.int64), [0], t))
        assert np.abs(out - ref[:, t]).max() <= ATOL
    assert torch.get_num_threads() == threads


def test_left_padded_batch_matches_each_prompt_alone(runner, hf_model):
    rng = np.random.default_rng(2)
    lengths = [3, 9, 6]
    prompts = [rng.integers(0, 50257, n) for n in lengths]
    width = max(lengths)
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    pos = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    runner.allocate_kv(3, width + 2)
    ours = runner.execute(StepInput(ids, pos, mask, [0, 1, 2], 0))
    padded_ref = hf_logits(hf_model, ids, mask)[:, -1]
    assert np.abs(ours - padded_ref).max() <= ATOL
    for i, p in enumerate(prompts):
        alone = hf_logits(hf_model, p[None], np.ones((1, len(p)), np.int64))[0, -1]
        assert np.abs(ours[i] - alone).max() <= ATOL
    # One decode step on a subset of slots (row 1 finished): rows keep their own cache.
    nxt = np.array([[7], [11]])
    m2 = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)[[2, 0]]
    out = runner.execute(StepInput(nxt, pos[[2, 0], -1:] + 1, m2, [2, 0], width))
    for row, i in enumerate([2, 0]):
        full = np.concatenate([prompts[i], nxt[row]])
        alone = hf_logits(hf_model, full[None], np.ones((1, len(full)), np.int64))[0, -1]
        assert np.abs(out[row] - alone).max() <= ATOL
    # Then the short, left-padded row 0 goes on alone (a batch-1 step over its padded cache).
    nxt2 = np.array([[13]])
    m3 = np.concatenate([m2[1:], np.ones((1, 1), np.int64)], 1)
    out = runner.execute(StepInput(nxt2, pos[[0], -1:] + 2, m3, [0], width + 1))
    full = np.concatenate([prompts[0], nxt[1], nxt2[0]])
    alone = hf_logits(hf_model, full[None], np.ones((1, len(full)), np.int64))[0, -1]
    assert np.abs(out[0] - alone).max() <= ATOL


def test_bfloat16_weights_track_float32(hf_dir):
    ids = np.arange(100, 110)[None]
    outs = []
    for dtype in ("float32", "bfloat16"):
        with TorchRunner(RunnerConfig(model=resolve_model(str(hf_dir)), dtype=dtype)) as r:
            r.allocate_kv(1, 10)
            outs.append(r.execute(StepInput(ids, np.arange(10)[None], np.ones((1, 10), np.int64), [0], 0)))
    assert outs[1].dtype == np.float32
    assert np.abs(outs[0] - outs[1]).max() < 0.05


def test_random_presets_have_real_shapes():
    from mini_engine.model.config import PRESETS

    assert abs(PRESETS["gpt2"].num_parameters - 124_439_808) < 1e3
    assert abs(PRESETS["gpt2-xl"].num_parameters - 1_557_611_200) < 1e3
