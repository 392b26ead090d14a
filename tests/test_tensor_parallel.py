"""Tensor parallelism on CPU (gloo): TP=2 against TP=1 and transformers, refusals, and what a dead
or stuck rank does. Real ranks (spawned processes) on a seeded checkpoint made here."""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mini_engine.core.plan import PagedStep
from mini_engine.errors import ConfigError, MiniEngineError
from mini_engine.model.source import resolve_model
from mini_engine.runner import RunnerConfig
from mini_engine_backends.pytorch import TorchRunner
from mini_engine_backends.pytorch.tensor_parallel import TensorParallelError

BS = 4  # block size: small, so rows span several blocks


def runner(model, tp=1, **options):
    opts = dict(options, tensor_parallel_size=tp) if tp > 1 else options
    return TorchRunner(RunnerConfig(resolve_model(str(model)), options=opts))


def step(rows, blocks):
    """A ragged step: rows = [(new token ids, tokens already cached)], blocks = each row's block table."""
    ids, pos, slots, starts = [], [], [], [0]
    for (new, cached), table in zip(rows, blocks):
        p = np.arange(cached, cached + len(new))
        ids += list(new)
        pos += list(p)
        slots += list(np.asarray(table)[p // BS] * BS + p % BS)
        starts.append(starts[-1] + len(new))
    width = max(len(t) for t in blocks)
    tables = np.full((len(rows), width), -1, np.int32)
    for r, t in enumerate(blocks):
        tables[r, :len(t)] = t
    return PagedStep(np.array(ids, np.int64), np.array(pos, np.int64), np.array(starts, np.int64),
                     np.array([c for _, c in rows], np.int64), tables, np.array(slots, np.int64),
                     np.arange(len(rows), dtype=np.int64), BS)


def tp_pids(r):
    return r.describe()["tensor_parallel"]["pids"][1:]


@pytest.fixture(scope="module")
def engine2(hf_dir):
    """An engine over two ranks. No prefix cache: tests also drive its runner directly, over
    blocks the scheduler thinks free, which a cached block's stale hash must not point at."""
    from mini_engine import Engine

    engine = Engine.from_config(None, model=str(hf_dir), backend="torch",
                                **{"backend.options.tensor_parallel_size": 2, "scheduler.block_size": BS,
                                   "scheduler.max_num_batched_tokens": 16, "scheduler.enable_prefix_caching": False})
    pids = tp_pids(engine.runner)
    yield engine
    engine.close()
    assert not any(_alive(p) for p in pids), "close() left a rank running"


@pytest.fixture(scope="module")
def pair(hf_dir, engine2):
    """The same checkpoint on one process and on two ranks."""
    with runner(hf_dir).load() as one:
        one.allocate_kv_pool(32, BS)
        yield one, engine2.runner


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_tp2_logits_match_tp1_over_prefill_chunks_and_decodes(pair):
    one, two = pair
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 50000, n).tolist() for n in (9, 5, 3))
    tables = [[0, 1, 2, 3], [4, 5], [6, 7, 8]]
    steps = [step([(a[:6], 0), (b, 0)], tables[:2]),  # two prefills, one cut short (a chunk)
             step([(a[6:], 6), (b[-1:], 5), (c, 0)], tables),  # a chunk's rest, a decode, a new prefill
             step([(a[-1:], 9), (b[-1:], 6), (c[-1:], 3)], tables)]  # decodes
    for s in steps:
        want, got = one.execute_paged(s), two.execute_paged(s)
        assert got.shape == want.shape == (s.num_rows, 50257)
        assert np.abs(got - want).max() <= 1e-4


def test_gloo_transport_gives_the_same_logits(hf_dir, pair):
    """tp_comm = gloo (and the gloo path every rank takes for a tensor too big for shared memory)."""
    one, _ = pair
    rng = np.random.default_rng(1)
    s = step([(rng.integers(0, 50000, 7).tolist(), 0)], [[20, 21]])
    with runner(hf_dir, tp=2, tp_comm="gloo").load() as gloo:
        gloo.allocate_kv_pool(32, BS)
        assert gloo.describe()["tensor_parallel"]["collectives"] == "gloo"
        assert np.abs(gloo.execute_paged(s) - one.execute_paged(s)).max() <= 1e-4


def test_describe_records_the_split_threads_and_collective_times(pair):
    _, two = pair
    info = two.describe()
    tp = info["tensor_parallel"]
    assert tp["size"] == 2 and tp["per_rank"]["heads"] == 2 and tp["embeddings"] == "replicated"
    assert tp["threads_per_rank"] == max(1, len(os.sched_getaffinity(0)) // 2) == info["threads"]
    assert tp["steps"] >= 3 and tp["all_reduce_calls"] == 2 * 2 * tp["steps"]  # 2 per block, 2 blocks
    assert tp["all_reduce_s"] > 0 and tp["gather_bytes"] > 0 and tp["collectives"].startswith("shared memory")
    mine = f"mini-engine-tp-{os.getpid()}-"
    assert not any(p.name.startswith(mine) for p in Path("/dev/shm").iterdir())  # unlinked once mapped


def test_greedy_tp2_equals_transformers(engine2, hf_model):
    from mini_engine.sampling import SamplingParams

    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 50000, n).tolist() for n in (7, 19, 3, 12)]
    assert engine2.continuous
    ids = [engine2.add_request(None, p, SamplingParams(max_new_tokens=10, ignore_eos=True)).request_id
           for p in prompts]
    done = {}
    while engine2.has_unfinished_requests():
        for out in engine2.step():
            if out.finished:
                done[out.request_id] = out.completion.token_ids
    for p, rid in zip(prompts, ids):
        x = torch.tensor([p])
        ref = hf_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=10,
                                min_new_tokens=10, pad_token_id=50256)[0, len(p):].tolist()
        assert done[rid] == ref


@pytest.mark.parametrize("options,device,dtype,message", [
    ({"tensor_parallel_size": 3}, "cpu", "float32", "must divide the model's 4 attention heads"),
    ({"tensor_parallel_size": 2}, "cpu", "int8", "float32 only, not int8"),
    ({"tensor_parallel_size": 2}, "cpu", "bfloat16", "float32 only, not bfloat16"),
    ({"tensor_parallel_size": 2}, "cuda", "float32", "runs on CPU only"),
    ({"tensor_parallel_size": 0}, "cpu", "float32", "must be >= 1"),
    ({"tensor_parallel_size": 2, "tp_timeout_s": 0}, "cpu", "float32", "must be > 0"),
    ({"tensor_parallel_size": 2, "tp_comm": "mpi"}, "cpu", "float32", "must be shm or gloo"),
])
def test_refusals_are_one_line(hf_dir, options, device, dtype, message):
    with pytest.raises(ConfigError, match=message) as e:
        TorchRunner(RunnerConfig(resolve_model(str(hf_dir)), device=device, dtype=dtype, options=options)).load()
    assert "\n" not in str(e.value)


def test_shm_collectives_are_refused_off_x86(hf_dir, monkeypatch):
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    with pytest.raises(ConfigError, match="x86-64 store ordering.*aarch64; use tp_comm = 'gloo'") as e:
        TorchRunner(RunnerConfig(resolve_model(str(hf_dir)), device="cpu",
                                 options={"tensor_parallel_size": 2})).load()
    assert "\n" not in str(e.value)


def test_cli_refusal_is_one_line_without_traceback(hf_dir):
    from conftest import run_cli

    proc = run_cli("generate", "--model", hf_dir, "--set", "backend.options.tensor_parallel_size=3", "hi")
    assert proc.returncode != 0
    assert "must divide" in proc.stderr and "Traceback" not in proc.stderr


def test_killed_rank_is_a_clear_error_not_a_hang(hf_dir):
    from mini_engine import Engine
    from mini_engine.async_engine import AsyncEngine
    from mini_engine.sampling import SamplingParams

    engine = Engine.from_config(None, model=str(hf_dir), backend="torch",
                                **{"backend.options.tensor_parallel_size": 2, "backend.options.tp_timeout_s": 20})
    loop = AsyncEngine(engine)
    try:
        params = SamplingParams(max_new_tokens=60, ignore_eos=True)
        assert len(loop.generate("warm up", params).token_ids) == 60
        assert engine.runner.health_problem() is None
        pid = tp_pids(engine.runner)[0]
        killer = threading.Timer(0.05, os.kill, (pid, signal.SIGKILL))
        t0 = time.monotonic()
        killer.start()
        with pytest.raises(MiniEngineError, match=r"rank 1 \(pid \d+\) was killed by SIGKILL"):
            for _ in range(1000):  # generations until the kill lands in one
                loop.generate("keep going", params)
        assert time.monotonic() - t0 < 20  # well within the timeout: the dead peer is noticed
        assert not loop.is_alive and isinstance(loop.error, TensorParallelError)
        assert "restart the engine" in engine.runner.health_problem()
    finally:
        loop.close()
        engine.close()


def test_stuck_rank_times_out_and_the_group_stays_failed(hf_dir):
    r = runner(hf_dir, tp=2, tp_timeout_s=2).load()
    try:
        r.allocate_kv_pool(8, BS)
        s = step([([1, 2, 3], 0)], [[0]])
        r.execute_paged(s)
        pid = tp_pids(r)[0]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(TensorParallelError, match="did not answer within backend.options.tp_timeout_s = 2 s"):
            r.execute_paged(s)
        assert 1.5 < time.monotonic() - t0 < 8
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(TensorParallelError, match="did not answer"):  # the group stays failed
            r.execute_paged(s)
    finally:
        r.close()
    assert not _alive(pid)


def test_health_reports_a_rank_killed_while_idle(hf_dir):
    import httpx

    from server_util import running_server

    with running_server(str(hf_dir), overrides={"backend.options.tensor_parallel_size": 2}) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        os.kill(tp_pids(server.engine.runner)[0], signal.SIGKILL)
        deadline = time.monotonic() + 5
        while (r := httpx.get(f"{server.url}/health")).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        # The open /health says no more than that (the log names the rank and the signal).
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable" and "SIGKILL" not in r.text
        assert "was killed by SIGKILL" in server.engine.runner.health_problem()
