"""The continuous-batching scheduler: FCFS admission, decodes first, a token budget per step.

Each step (vLLM's policy): every running sequence gets its next token(s) first (one for a
decode, the next chunk for a prompt still being prefilled); then waiting requests are
admitted in arrival order while sequences, budget and KV blocks last, their prompts cut
into chunks when chunked prefill is on. When a running sequence needs a block and none is
free, the newest running sequence is preempted: its blocks are freed (full ones stay in the
prefix cache) and it goes back to the front of the queue, to be recomputed from its prompt
and the tokens it had already generated.
"""
from __future__ import annotations

import time
from collections import deque

from ..errors import MiniEngineError, PromptTooLong
from .block_manager import BlockManager
from .plan import ScheduledSeq, SchedulerOutput
from .request import Request, RequestStatus
from .scheduler_config import SchedulerConfig


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int):
        config.check_model(max_model_len)
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._freed: list[str] = []  # request ids freed since the last plan that ran

    # ----- requests -------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise MiniEngineError(f"request id '{req.request_id}' is already in use")
        self.check_fits(req.num_prompt_tokens, req.params.max_new_tokens)
        req.status = RequestStatus.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def check_fits(self, num_prompt: int, max_new_tokens: int) -> None:
        """Refuse a request the pool could never hold, even alone (it would wait forever).

        Reads only constants, so any thread may call it.
        """
        bm = self.block_manager
        longest = min(num_prompt + max_new_tokens, self.max_model_len)
        if bm.blocks_for(longest) > bm.num_blocks:
            raise PromptTooLong(
                f"the request needs up to {longest} tokens of KV cache ({num_prompt} prompt + {max_new_tokens} "
                f"new) but the pool holds {bm.num_blocks * bm.block_size} ({bm.num_blocks} blocks of "
                f"{bm.block_size}); raise scheduler.kv_cache_mib or scheduler.num_kv_blocks, or ask for fewer tokens")

    def abort_request(self, request_id: str) -> Request | None:
        """Stop `request_id` wherever it is and free its KV blocks at once."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        self.finish_request(req, "abort")
        return req

    def finish_request(self, req: Request, reason: str) -> None:
        if req.finished:
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.block_manager.free(req)
        self._freed.append(req.request_id)
        req.status, req.finish_reason = RequestStatus.FINISHED, reason
        req.finish_s = req.finish_s or time.perf_counter()
        del self.requests[req.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # ----- one step ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg, bm = self.config, self.block_manager
        out = SchedulerOutput(block_size=bm.block_size)
        budget = cfg.max_num_batched_tokens
        # Running sequences first, oldest first, so a preemption always hits the newest.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            if n < 1:
                raise MiniEngineError(f"internal: running request {req.request_id} has no token to compute "
                                      f"(its last step was not postprocessed)")
            while not bm.can_append(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                cached = req.num_computed
                bm.append_slots(req, n)
                out.seqs.append(ScheduledSeq(req, n, cached, cached + n == req.num_tokens))
                budget -= n
                i += 1
                continue
            break
        # Then new prompts, in arrival order; none while the pool is short enough to preempt.
        while not out.preempted and self.waiting and len(self.running) < cfg.max_num_seqs and budget > 0:
            req = self.waiting[0]
            hits = bm.match_prefix(req)
            cached = len(hits) * bm.block_size
            n = req.num_tokens - cached
            if n > budget:
                if not cfg.enable_chunked_prefill:
                    break
                n = budget
            if not bm.can_allocate(hits, cached + n):
                break
            self.waiting.popleft()
            bm.allocate(req, hits, cached + n)
            if not req.first_scheduled_s:
                req.first_scheduled_s = time.perf_counter()
                req.num_cached_prompt = cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.seqs.append(ScheduledSeq(req, n, cached, cached + n == req.num_tokens))
            budget -= n
        if out.seqs:  # a plan that does not run would lose them
            out.freed, self._freed = self._freed, []
        return out

    def restore_freed(self, ids: list[str]) -> None:
        """A plan did not run: the runner has still to hear about the requests it named as freed."""
        self._freed[:0] = ids

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        self._freed.append(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def update_from_output(self, out: SchedulerOutput) -> None:
        """The step ran: its tokens' K/V are in the cache."""
        for s in out.seqs:
            req = s.request
            if req.finished:
                continue  # aborted while the step ran
            req.num_computed = s.num_cached + s.num_new
            self.block_manager.cache_full_blocks(req)

    # ----- facts ------------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {"running": len(self.running), "waiting": len(self.waiting), "kv_usage": bm.usage,
                "prefix_cache_queries": bm.prefix_queries, "prefix_cache_hits": bm.prefix_hits,
                "preemptions": self.num_preemptions, "evictions": bm.evictions}
