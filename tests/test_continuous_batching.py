"""Continuous batching end to end: greedy output equals transformers' generate() for each prompt
alone, with staggered arrivals, prefix caching on and off, chunked prefill and preemption."""
import numpy as np
import pytest
import torch

# "torch-ops": the torch backend with paged attention in torch ops (paged_sdpa.py: gathers the
# blocks; the path CUDA and bfloat16 take) instead of the CPU float32 numba kernel.
BACKENDS = ["torch", "torch-ops", "onnxruntime"]


def hf_greedy(hf_model, prompt_ids, n):
    ids = torch.tensor([prompt_ids])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                            min_new_tokens=n, pad_token_id=50256)
    return out[0, ids.shape[1]:].tolist()


def prompts(n, seed=0, lo=3, hi=40, shared=0):
    rng = np.random.default_rng(seed)
    head = rng.integers(0, 50000, shared).tolist()
    return [head + rng.integers(0, 50000, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def engine_for(hf_dir, backend, **scheduler):
    from mini_engine import Engine

    sections = {f"scheduler.{k}": v for k, v in scheduler.items()}
    if backend == "torch-ops":
        backend, sections["backend.options.paged_attention"] = "torch", "torch"
    return Engine.from_config(None, model=str(hf_dir), backend=backend, **sections)


def run_staggered(engine, prompt_ids, max_new, every=2):
    """Submit one request every `every` steps, so steps mix prefills and decodes."""
    from mini_engine.sampling import SamplingParams

    params = [SamplingParams(max_new_tokens=m, ignore_eos=True) for m in max_new]
    pending = list(range(len(prompt_ids)))
    done, step = {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and step % every == 0:
            i = pending.pop(0)
            engine.add_request(str(i), prompt_ids[i], params[i])
        for out in engine.step():
            if out.finished:
                done[int(out.request_id)] = out.completion
        step += 1
    return [done[i] for i in range(len(prompt_ids))]


@pytest.fixture(scope="module")
def references(hf_model):
    cache = {}

    def ref(ids, n):
        key = (tuple(ids), n)
        if key not in cache:
            cache[key] = hf_greedy(hf_model, ids, n)
        return cache[key]

    return ref


CASES = {
    "default": {},
    "no-prefix-cache": {"enable_prefix_caching": False},
    "chunked": {"max_num_batched_tokens": 8, "block_size": 4},
    "preemption": {"num_kv_blocks": 12, "block_size": 4, "max_num_seqs": 8},
    # Blocks of the size the torch CPU kernel asks for on GPT-2 (128), scaled to this model's
    # 128-token window: rows end mid-block, and the 20-token shared prefix fills no block.
    "large-blocks": {"block_size": 32},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_staggered_greedy_equals_transformers(hf_dir, references, backend, case):
    shared = 20 if case != "preemption" else 0  # a common prefix: the prefix cache has something to hit
    ps = prompts(6, seed=1, shared=shared, hi=20 if case == "preemption" else 40)
    max_new = [4 + 3 * (i % 4) for i in range(len(ps))]
    with engine_for(hf_dir, backend, **CASES[case]) as engine:
        got = run_staggered(engine, ps, max_new)
        stats = engine.stats()
        assert engine.continuous, engine.static_reason
    for p, n, c in zip(ps, max_new, got):
        assert c.token_ids == references(p, n), f"prompt of {len(p)} tokens diverged"
        assert c.finish_reason == "length"
    assert stats["kv_usage"] == 0 and stats["running"] == stats["waiting"] == 0
    if case == "preemption":
        assert stats["preemptions"] > 0
    if case == "default" and engine.config.scheduler.enable_prefix_caching:
        assert stats["prefix_cache_hits"] > 0
    if case == "no-prefix-cache":
        assert stats["prefix_cache_hits"] == 0
    if case == "chunked":
        assert any(c.ttft_ms > 0 for c in got)


def test_block_size_auto_is_the_backends_choice_within_the_window(hf_dir, tmp_path):
    """block_size = 0 (the default): the torch kernel's 128 on a 1024-token window, capped to 1/8 of
    a 128-token window (16); onnxruntime's slots layout asks for 16; a number given is kept."""
    from conftest import make_hf_checkpoint

    make_hf_checkpoint(tmp_path, n_positions=1024)
    for model, backend, sections, want in ((tmp_path, "torch", {}, 128), (hf_dir, "torch", {}, 16),
                                           (hf_dir, "onnxruntime", {}, 16),
                                           (tmp_path, "torch", {"block_size": 32}, 32)):
        with engine_for(model, backend, **sections) as engine:
            assert engine.config.scheduler.block_size == want, (model, backend)
            assert engine.describe()["generation"]["block_size"] == want
            assert f"x {want} tokens" in engine.kv_capacity or backend == "onnxruntime"


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_runs_on_the_scheduler(hf_dir, references, backend):
    with engine_for(hf_dir, backend) as engine:
        assert engine.continuous and engine.describe()["generation"]["mode"] == "continuous batching"
        texts = ["Hello world", "The quick brown fox jumps over the lazy dog", "A"]
        got = engine.generate(texts, max_new_tokens=9, ignore_eos=True)
    for c in got:
        assert c.token_ids == references(c.prompt_token_ids, 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_sampling_params_are_per_request(hf_dir, backend):
    """A seeded request gives the same text alone and beside others with other settings."""
    from mini_engine.sampling import SamplingParams

    sampled = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=40, seed=7, ignore_eos=True)
    with engine_for(hf_dir, backend) as engine:
        alone = engine.generate("Once upon a time", sampled)[0].token_ids
        ids = engine.tokenizer.encode("Once upon a time")
        engine.add_request("greedy", engine.tokenizer.encode("Hello there"), SamplingParams(max_new_tokens=12))
        engine.add_request("hot", engine.tokenizer.encode("x y z"),
                           SamplingParams(max_new_tokens=5, temperature=1.5, seed=1))
        engine.step()
        engine.add_request("seeded", ids, sampled)
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.completion
    assert done["seeded"].token_ids == alone


def test_abort_frees_blocks(hf_dir):
    with engine_for(hf_dir, "torch") as engine:
        from mini_engine.sampling import SamplingParams

        engine.add_request("a", [1, 2, 3, 4, 5] * 8, SamplingParams(max_new_tokens=50))
        engine.step()
        assert engine.stats()["kv_usage"] > 0
        engine.abort_request("a")
        assert engine.stats()["kv_usage"] == 0 and not engine.has_unfinished_requests()


def test_request_that_can_never_fit_is_one_clear_error(hf_dir):
    from mini_engine.errors import PromptTooLong
    from mini_engine.sampling import SamplingParams

    with engine_for(hf_dir, "torch", num_kv_blocks=2, block_size=4) as engine:
        with pytest.raises(PromptTooLong, match="pool holds 8"):
            engine.add_request("big", list(range(10)), SamplingParams(max_new_tokens=4))


def test_gqa_export_from_the_cli_runs_continuous_and_the_runner_refuses_a_mismatch(tmp_path, hf_dir, references):
    """`export onnx --kv-cache gqa` gives an export that --model runs on continuous batching; a concat
    export asked to serve as gqa is one clear line."""
    from conftest import run_cli

    from mini_engine import Engine
    from mini_engine.errors import ModelNotFound

    gqa = tmp_path / "gqa"
    proc = run_cli("export", "onnx", "--model", hf_dir, "--out", gqa, "--kv-cache", "gqa", check=True)
    assert "pass" in proc.stderr and "FAIL" not in proc.stderr
    with Engine(model=str(gqa), backend="onnxruntime") as engine:
        assert engine.continuous and engine.runner.describe()["kv_cache"].startswith("gqa-v1")
        c = engine.generate("Hello there", max_new_tokens=7, ignore_eos=True)[0]
        assert c.token_ids == references(c.prompt_token_ids, 7)
    concat = tmp_path / "concat"
    run_cli("export", "onnx", "--model", hf_dir, "--out", concat, "--logits", "last", check=True)
    with pytest.raises(ModelNotFound, match="concat kv cache contract"):
        Engine(model=str(concat), backend="onnxruntime", kv_cache="gqa")
    with Engine(model=str(concat), backend="onnxruntime") as engine:  # auto: static batching, says why
        assert not engine.continuous and "--kv-cache gqa" in engine.static_reason
    bad = run_cli("generate", "--model", concat, "--backend", "onnxruntime", "--set", "backend.options.kv_cache=gqa", "x")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len([line for line in bad.stderr.splitlines() if line.startswith("Error")]) == 1


def test_bfloat16_runs_continuous_on_the_torch_ops_path(hf_dir):
    """bfloat16 on CPU: a paged prefill and decode give the static path's bfloat16 logits, and the
    engine generates on continuous batching with a pool half float32's size per token."""
    from mini_engine import Engine
    from mini_engine.core.plan import PagedStep
    from mini_engine.model.source import resolve_model
    from mini_engine.runner import RunnerConfig, StepInput
    from mini_engine_backends.pytorch import TorchRunner

    ids = np.arange(100, 110)
    with TorchRunner(RunnerConfig(model=resolve_model(str(hf_dir)), dtype="bfloat16")) as r:
        assert r.paged_unsupported_reason() is None and "torch ops" in r.describe()["paged"]
        r.allocate_kv(1, 11)
        static = r.execute(StepInput(ids[None], np.arange(10)[None], np.ones((1, 10), np.int64), [0], 0))
        static_next = r.execute(StepInput(np.array([[7]]), np.array([[10]]), np.ones((1, 11), np.int64), [0], 10))
        r.allocate_kv_pool(8, 4)
        table = np.array([[5, 2, 7, -1]], np.int32)  # blocks out of order, as in a pool in use
        slots = lambda pos: table[0, pos // 4] * 4 + pos % 4
        pos = np.arange(10)
        paged = r.execute_paged(PagedStep(ids, pos, np.array([0, 10]), np.array([0]), table, slots(pos),
                                          np.array([0]), 4))
        paged_next = r.execute_paged(PagedStep(np.array([7]), np.array([10]), np.array([0, 1]), np.array([10]),
                                               table, slots(np.array([10])), np.array([0]), 4))
    assert np.abs(paged - static).max() < 0.05 and np.abs(paged_next - static_next).max() < 0.05
    with Engine(model=str(hf_dir), backend="torch", dtype="bfloat16") as engine:
        assert engine.continuous, engine.static_reason
        assert engine.runner.kv_bytes_per_token == 2 * 2 * 2 * 64  # K and V, 2 layers, 64 wide, 2 bytes
        got = engine.generate(["Hello world", "A"], max_new_tokens=5, ignore_eos=True)
        assert [len(c.token_ids) for c in got] == [5, 5] and engine.stats()["kv_usage"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device visible to PyTorch")
@pytest.mark.parametrize("case", ["default", "chunked", "preemption"])
def test_cuda_torch_ops_path_equals_transformers(hf_dir, references, case):
    """On a GPU: continuous batching through paged_attention = "torch" (SDPA over gathered blocks)
    gives transformers' greedy tokens; "auto" keeps the static CUDA-graph path and says why."""
    from mini_engine import Engine

    with Engine(model=str(hf_dir), backend="torch", device="cuda") as engine:
        assert not engine.continuous and "paged_attention = 'torch'" in engine.static_reason
    shared = 20 if case != "preemption" else 0
    ps = prompts(6, seed=1, shared=shared, hi=20 if case == "preemption" else 40)
    max_new = [4 + 3 * (i % 4) for i in range(len(ps))]
    sections = {f"scheduler.{k}": v for k, v in CASES[case].items()}
    with Engine.from_config(None, model=str(hf_dir), backend="torch", device="cuda",
                            **{"backend.options.paged_attention": "torch"}, **sections) as engine:
        assert engine.continuous, engine.static_reason
        got = run_staggered(engine, ps, max_new)
    for p, n, c in zip(ps, max_new, got):
        assert c.token_ids == references(p, n)
