"""Block manager: reference counts, prefix-cache hits and misses, LRU eviction, the last-token rule."""
import subprocess
import sys

import pytest

from mini_engine.core import BlockManager, Request
from mini_engine.core.block_manager import block_hash
from mini_engine.errors import MiniEngineError
from mini_engine.sampling import SamplingParams


def req(tokens, rid="r"):
    return Request(rid, list(tokens), SamplingParams())


def admit(bm, r, extra=0):
    hits = bm.match_prefix(r)
    assert bm.can_allocate(hits, r.num_tokens + extra)
    bm.allocate(r, hits, r.num_tokens + extra)
    return hits


def compute_all(bm, r):
    r.num_computed = r.num_tokens
    bm.cache_full_blocks(r)


def test_core_imports_no_torch():
    code = "import sys, mini_engine.core; assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_and_free_count_references():
    bm = BlockManager(8, 4)
    a = req(range(10))
    admit(bm, a)
    assert len(a.block_ids) == 3 and bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    bm.free(a)
    assert bm.num_free_blocks == 8 and a.block_ids == [] and bm.usage == 0


def test_full_blocks_hit_and_share_references():
    bm = BlockManager(8, 4)
    a = req(range(10), "a")
    admit(bm, a)
    compute_all(bm, a)
    b = req(list(range(8)) + [99, 98, 97], "b")
    hits = admit(bm, b)
    assert hits == a.block_ids[:2]  # two full blocks of 4 shared; the partial third is not cached
    assert b.num_computed == 8
    assert all(bm.blocks[x].ref_count == 2 for x in hits)
    assert bm.prefix_hits == 8 and bm.prefix_queries == 10 + 11
    bm.free(a)
    assert all(bm.blocks[x].ref_count == 1 for x in hits)


def test_last_token_is_always_computed():
    bm = BlockManager(8, 4)
    a = req(range(8), "a")
    admit(bm, a)
    compute_all(bm, a)
    b = req(range(8), "b")  # the same 8 tokens: both blocks are cached, but the last token must run
    hits = admit(bm, b)
    assert len(hits) == 1 and b.num_computed == 4


def test_different_tokens_under_the_same_hash_is_a_miss():
    bm = BlockManager(8, 4)
    a = req(range(8), "a")
    admit(bm, a)
    compute_all(bm, a)
    # Forge a collision: b's first block hashes to a's cached hash but holds other tokens.
    b = req([7, 7, 7, 7, 1, 2, 3, 4, 5], "b")
    forged = block_hash(None, tuple(b.token_ids[:4]))
    bm.cached[forged] = a.block_ids[0]
    assert bm.match_prefix(b) == []


def test_prefix_chain_breaks_at_first_difference():
    bm = BlockManager(8, 4)
    a = req(range(12), "a")
    admit(bm, a)
    compute_all(bm, a)
    b = req([0, 1, 2, 3, 9, 9, 9, 9] + list(range(8, 12)) + [5], "b")  # block 3 equals a's, block 2 does not
    assert bm.match_prefix(b) == a.block_ids[:1]


def test_cached_blocks_survive_finish_and_are_evicted_lru():
    bm = BlockManager(4, 2)
    a = req([1, 2, 3, 4, 5], "a")
    admit(bm, a)
    compute_all(bm, a)
    bm.free(a)  # a's two full blocks stay cached while free
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    b = req([1, 2, 3, 4, 6], "b")
    assert len(admit(bm, b)) == 2  # served from the cache after a finished
    bm.free(b)
    c = req([9, 9, 8, 8, 7, 7, 6], "c")  # needs all 4 blocks: evicts the cached ones
    admit(bm, c)
    assert bm.cached == {} and bm.evictions == 2


def test_uncached_blocks_are_reused_before_cached_ones():
    bm = BlockManager(4, 2)
    a = req([1, 2, 3], "a")  # one full (cached) block, one partial
    admit(bm, a)
    compute_all(bm, a)
    full, partial = a.block_ids
    bm.free(a)
    b = req([5], "b")
    admit(bm, b)
    assert b.block_ids[0] != full  # the cached block is kept, a fresh or partial one is used
    assert bm.match_prefix(req([1, 2, 4], "c")) == [full]


def test_append_slots_grows_one_block_at_a_time():
    bm = BlockManager(3, 2)
    a = req([1, 2], "a")
    admit(bm, a)
    compute_all(bm, a)
    assert bm.can_append(a, 1)
    bm.append_slots(a, 1)
    assert len(a.block_ids) == 2
    a.num_computed = 3
    bm.append_slots(a, 1)  # still fits the second block
    assert len(a.block_ids) == 2
    a.num_computed = 4
    bm.append_slots(a, 2)
    assert len(a.block_ids) == 3 and not bm.can_append(a, 3)
    with pytest.raises(MiniEngineError):
        bm.append_slots(a, 3)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    a = req(range(9), "a")
    admit(bm, a)
    compute_all(bm, a)
    assert bm.match_prefix(req(range(9), "b")) == [] and bm.cached == {}


def test_reset_prefix_cache():
    bm = BlockManager(4, 2)
    a = req([1, 2, 3], "a")
    admit(bm, a)
    compute_all(bm, a)
    with pytest.raises(MiniEngineError):
        bm.reset_prefix_cache()
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.match_prefix(req([1, 2, 4], "b")) == []
