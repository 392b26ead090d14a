"""Scheduler: FCFS, decodes before prefills, token budget, chunked prefill, preemption and recompute, abort."""
import pytest

from mini_engine.core import BlockManager, Request, Scheduler, SchedulerConfig
from mini_engine.errors import ConfigError, PromptTooLong
from mini_engine.sampling import SamplingParams


def make(num_blocks=64, block_size=4, max_len=128, **kw):
    cfg = SchedulerConfig(block_size=block_size, num_kv_blocks=num_blocks, **kw)
    return Scheduler(cfg, BlockManager(num_blocks, block_size, cfg.enable_prefix_caching), max_len)


def req(rid, n, max_new=8, first=0):
    return Request(rid, list(range(first, first + n)), SamplingParams(max_new_tokens=max_new))


def run_step(s, token=1):
    """Schedule, pretend the runner ran, append a token to every sequence that sampled."""
    out = s.schedule()
    s.update_from_output(out)
    for seq in out.seqs:
        if seq.needs_logits:
            r = seq.request
            r.append_output(token)
            if len(r.output_ids) >= r.params.max_new_tokens:
                s.finish_request(r, "length")
    return out


def test_fcfs_and_decodes_first():
    s = make(max_num_batched_tokens=16)
    s.add_request(req("a", 10))
    out = run_step(s)
    assert [(q.request_id, q.num_new) for q in out.seqs] == [("a", 10)]
    s.add_request(req("b", 12, first=100))
    s.add_request(req("c", 3, first=200))
    out = run_step(s)
    # a's decode first, then the prompts in arrival order
    assert [(q.request_id, q.num_new) for q in out.seqs] == [("a", 1), ("b", 12), ("c", 3)]
    s2 = make(max_num_batched_tokens=12)
    s2.add_request(req("a", 4))
    run_step(s2)
    s2.add_request(req("b", 11, first=100))
    s2.add_request(req("c", 2, first=200))
    out = run_step(s2)
    assert [(q.request_id, q.num_new) for q in out.seqs] == [("a", 1), ("b", 11)]


def test_token_budget_and_chunked_prefill():
    s = make(max_num_batched_tokens=8)
    s.add_request(req("a", 20))
    chunks = []
    for _ in range(3):
        out = run_step(s)
        chunks.append([(q.num_cached, q.num_new, q.needs_logits) for q in out.seqs])
    assert chunks == [[(0, 8, False)], [(8, 8, False)], [(16, 4, True)]]
    r = s.running[0]
    assert r.num_computed == 20 and r.output_ids == [1]


def test_without_chunked_prefill_a_prompt_waits_for_a_step_with_room():
    s = make(max_num_batched_tokens=128, enable_chunked_prefill=False, max_len=128)
    s.add_request(req("a", 100))
    s.add_request(req("b", 100))
    out = run_step(s)
    assert [q.request_id for q in out.seqs] == ["a"]  # b does not fit what is left of the budget
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        make(max_num_batched_tokens=64, enable_chunked_prefill=False, max_len=128)


def test_max_num_seqs():
    s = make(max_num_seqs=2)
    for i in range(3):
        s.add_request(req(str(i), 4))
    out = run_step(s)
    assert [q.request_id for q in out.seqs] == ["0", "1"] and len(s.waiting) == 1


def test_preemption_recomputes_the_newest():
    # 6 blocks of 4 tokens: two sequences of 8 prompt tokens fill 4 blocks, then grow.
    s = make(num_blocks=6, block_size=4, enable_prefix_caching=False)
    s.add_request(req("a", 8, max_new=12))
    s.add_request(req("b", 8, max_new=12, first=50))
    run_step(s)
    preempted = []
    for _ in range(12):
        out = run_step(s)
        preempted += out.preempted
        if not s.has_unfinished_requests():
            break
    assert preempted and preempted[0] == "b"  # the newest goes first
    assert s.num_preemptions >= 1
    while s.has_unfinished_requests():
        run_step(s)
    assert s.block_manager.num_free_blocks == 6


def test_preempted_request_is_recomputed_from_prompt_and_outputs():
    s = make(num_blocks=5, block_size=4, enable_prefix_caching=False)
    s.add_request(req("a", 8, max_new=10))
    s.add_request(req("b", 7, max_new=10, first=50))
    run_step(s)
    seen = None
    for _ in range(10):
        out = run_step(s)
        if out.preempted:
            seen = s.waiting[0]
            break
    assert seen is not None and seen.num_computed == 0 and seen.output_ids
    n_tokens = seen.num_tokens
    # When it is readmitted, its whole known sequence (prompt + outputs so far) is recomputed.
    s.abort_request("a")
    out = s.schedule()
    (sched,) = [q for q in out.seqs if q.request is seen]
    assert sched.num_cached == 0 and sched.num_new == n_tokens and sched.needs_logits


def test_prefix_cache_hit_skips_cached_tokens():
    s = make(block_size=4)
    s.add_request(req("a", 10))
    run_step(s)
    s.add_request(req("b", 10))
    out = run_step(s)
    b = [q for q in out.seqs if q.request_id == "b"][0]
    assert b.num_cached == 8 and b.num_new == 2
    assert s.block_manager.prefix_hits == 8


def test_abort_frees_blocks_at_once():
    s = make(num_blocks=10)
    s.add_request(req("a", 10))
    s.add_request(req("b", 10, first=40))
    run_step(s)
    assert s.block_manager.num_free_blocks < 10
    s.abort_request("a")
    s.abort_request("b")
    assert s.block_manager.num_free_blocks == 10 and not s.has_unfinished_requests()
    assert s.abort_request("missing") is None


def test_abort_a_waiting_request():
    s = make(max_num_seqs=1)
    s.add_request(req("a", 4))
    s.add_request(req("b", 4))
    run_step(s)
    s.abort_request("b")
    assert [r.request_id for r in s.waiting] == []


def test_a_request_that_can_never_fit_is_rejected():
    s = make(num_blocks=4, block_size=4)  # 16 tokens
    with pytest.raises(PromptTooLong, match="pool holds 16"):
        s.add_request(req("a", 12, max_new=8))
    s.add_request(req("b", 8, max_new=8))


def test_duplicate_request_id():
    s = make()
    s.add_request(req("a", 4))
    with pytest.raises(Exception, match="already in use"):
        s.add_request(req("a", 4))


@pytest.mark.parametrize("kw", [{"max_num_seqs": 0}, {"block_size": -1}, {"max_num_batched_tokens": 0},
                                {"num_kv_blocks": -1}, {"kv_cache_mib": 0}, {"policy": "lifo"}])
def test_invalid_config(kw):
    with pytest.raises(ConfigError):
        SchedulerConfig(**kw)


def test_pool_size_from_memory_budget():
    cfg = SchedulerConfig(kv_cache_mib=1, block_size=16, max_num_seqs=1000)
    assert cfg.pool_blocks(bytes_per_token=1024, max_model_len=1024) == 64
    # Never more than max_num_seqs full windows.
    assert SchedulerConfig(kv_cache_mib=1024, max_num_seqs=2, block_size=16).pool_blocks(1024, 1024) == 128
    with pytest.raises(ConfigError, match="holds no block"):
        SchedulerConfig(kv_cache_mib=0.001, block_size=16).pool_blocks(10**6, 1024)
