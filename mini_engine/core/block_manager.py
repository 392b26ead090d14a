"""Fixed-size KV blocks: a free list, reference counts, block tables, and a prefix cache.

The prefix cache keys a *full* block by a hash of its token ids chained with its parent
block's hash, so a hit means the whole prefix up to and including the block matches. A hit
also compares the block's own token ids, so a collision on them is a miss, not wrong
attention; the parents are trusted to the 64-bit chain, as vLLM does.
Blocks keep their cached contents after their sequence finishes and sit in the free queue
in least-recently-used order; they are evicted only when a fresh block is needed. Blocks
that hold nothing reusable go to the front of the queue so they are handed out first.
"""
from __future__ import annotations

from collections import OrderedDict

import xxhash

from ..errors import MiniEngineError
from .request import Request


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def block_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    h = xxhash.xxh3_64()
    h.update((parent if parent is not None else 0).to_bytes(8, "little"))
    h.update(b"\x01" if parent is not None else b"\x00")
    for t in token_ids:
        h.update(t.to_bytes(4, "little"))
    return h.intdigest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise MiniEngineError(f"the KV pool needs at least one block of at least one token "
                                  f"(got {num_blocks} blocks of {block_size})")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        # Counters (tokens, as vLLM counts them).
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.evictions = 0

    # ----- facts --------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by a live sequence (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ----- prefix cache ---------------------------------------------------------------
    def match_prefix(self, req: Request) -> list[int]:
        """Cached blocks that hold `req`'s leading tokens; no side effects.

        Only blocks entirely before the last token count: the last token is always
        computed, because its logits are what the step is for.
        """
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        hits: list[int] = []
        parent = None
        for i in range((req.num_tokens - 1) // bs):
            tokens = tuple(req.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
            parent = h
        return hits

    # ----- allocation -----------------------------------------------------------------
    def can_allocate(self, hits: list[int], num_tokens: int) -> bool:
        """Whether a sequence reusing `hits` can hold `num_tokens` tokens."""
        reused_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return self.blocks_for(num_tokens) - len(hits) + reused_free <= len(self.free_queue)

    def allocate(self, req: Request, hits: list[int], num_tokens: int) -> None:
        """Give `req` the cached blocks `hits` and fresh blocks up to `num_tokens` tokens."""
        if req.block_ids:
            raise MiniEngineError(f"request {req.request_id} already holds KV blocks")
        if not self.can_allocate(hits, num_tokens):
            raise MiniEngineError("not enough free KV blocks (call can_allocate first)")
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free_queue[bid]
            block.ref_count += 1
        req.block_ids = list(hits)
        req.num_hashed_blocks = len(hits)
        req.num_computed = len(hits) * self.block_size
        if self.enable_prefix_caching and not req.num_preemptions:
            # A recomputed request hitting its own earlier blocks is not a prompt served from the cache.
            self.prefix_queries += req.num_tokens
            self.prefix_hits += req.num_computed
        self._grow(req, num_tokens)

    def can_append(self, req: Request, num_new: int) -> bool:
        return self.blocks_for(req.num_computed + num_new) - len(req.block_ids) <= len(self.free_queue)

    def append_slots(self, req: Request, num_new: int) -> None:
        """Make room for `num_new` more tokens after the ones already computed."""
        if not self.can_append(req, num_new):
            raise MiniEngineError("not enough free KV blocks (call can_append first)")
        self._grow(req, req.num_computed + num_new)

    def _grow(self, req: Request, num_tokens: int) -> None:
        for _ in range(self.blocks_for(num_tokens) - len(req.block_ids)):
            req.block_ids.append(self._take_free())

    def _take_free(self) -> int:
        bid, _ = self.free_queue.popitem(last=False)
        block = self.blocks[bid]
        if block.hash is not None:
            if self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
                self.evictions += 1
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return bid

    def cache_full_blocks(self, req: Request) -> None:
        """Register the blocks that `req` has filled since the last call with the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(req.num_computed // bs, len(req.block_ids))
        parent = self.blocks[req.block_ids[req.num_hashed_blocks - 1]].hash if req.num_hashed_blocks else None
        for i in range(req.num_hashed_blocks, full):
            tokens = tuple(req.token_ids[i * bs:(i + 1) * bs])
            h = block_hash(parent, tokens)
            block = self.blocks[req.block_ids[i]]
            block.hash, block.token_ids = h, tokens
            # A block computed twice (two requests with the same prefix in one step)
            # keeps the first copy as the cached one.
            self.cached.setdefault(h, block.block_id)
            parent = h
        req.num_hashed_blocks = max(req.num_hashed_blocks, full)

    def free(self, req: Request) -> None:
        """Drop `req`'s references; its blocks stay cached until evicted."""
        # Tail first, so that on eviction a sequence's last blocks (the least likely to be
        # shared by another prompt) go before its first ones.
        for bid in reversed(req.block_ids):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[bid] = None
                if block.hash is None or self.cached.get(block.hash) != bid:
                    self.free_queue.move_to_end(bid, last=False)  # nothing to keep: reuse first
        req.block_ids = []
        req.num_hashed_blocks = 0
        req.num_computed = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (vLLM's reset_prefix_cache); only while no sequence holds blocks."""
        if len(self.free_queue) != self.num_blocks:
            raise MiniEngineError("the prefix cache can only be reset while no sequence holds KV blocks")
        for block in self.blocks:
            block.hash, block.token_ids = None, ()
        self.cached.clear()

    def slot(self, req: Request, position: int) -> int:
        return req.block_ids[position // self.block_size] * self.block_size + position % self.block_size
