"""The typed plan between the scheduler and a runner (vLLM's SchedulerOutput).

The scheduler says, per sequence, which new tokens to compute, where they sit (positions),
how many tokens of the sequence are already cached, and which KV blocks hold it. `PagedStep`
flattens that into the arrays a runner executes: steps are ragged, so rows of different
lengths share a step without padding, and a prefill chunk and decodes can share one.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .request import Request


@dataclass
class ScheduledSeq:
    request: Request
    num_new: int  # tokens computed this step: token_ids[num_cached : num_cached + num_new]
    num_cached: int  # tokens of this sequence already in the KV cache
    needs_logits: bool  # the chunk ends at the sequence's newest token: sample after it

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # request ids sent back to the queue this step
    # Requests whose KV was freed since the last step (finished, aborted, preempted): a runner
    # that keeps per-sequence state (the ORT runner's cache slots) releases it.
    freed: list[str] = field(default_factory=list)
    block_size: int = 16

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def to_step(self) -> "PagedStep":
        seqs, bs = self.seqs, self.block_size
        n = self.num_tokens
        ids = np.empty(n, np.int64)
        pos = np.empty(n, np.int64)
        slots = np.empty(n, np.int64)
        starts = np.zeros(len(seqs) + 1, np.int64)
        width = max(len(s.request.block_ids) for s in seqs)
        tables = np.full((len(seqs), width), -1, np.int32)
        logits_rows = []
        at = 0
        for r, s in enumerate(seqs):
            req, lo, hi = s.request, s.num_cached, s.num_cached + s.num_new
            ids[at:at + s.num_new] = req.token_ids[lo:hi]
            p = np.arange(lo, hi, dtype=np.int64)
            pos[at:at + s.num_new] = p
            table = np.asarray(req.block_ids, np.int64)
            slots[at:at + s.num_new] = table[p // bs] * bs + p % bs
            tables[r, :len(req.block_ids)] = req.block_ids
            at += s.num_new
            starts[r + 1] = at
            if s.needs_logits:
                logits_rows.append(r)
        context = np.array([s.num_cached for s in seqs], np.int64)
        return PagedStep(ids, pos, starts, context, tables, slots, np.array(logits_rows, np.int64), bs,
                         [s.request_id for s in seqs], list(self.freed))


@dataclass
class PagedStep:
    """One ragged, block-addressed step: what `Runner.execute_paged` receives.

    Row r computes tokens input_ids[query_start[r]:query_start[r+1]] at positions
    context_lens[r], context_lens[r]+1, ...; their K/V go to pool slots slot_mapping
    (block * block_size + offset); each attends causally over the row's first
    context_lens[r] cached tokens (in block_tables[r]) and the row's new tokens.
    Logits come back for the last new token of each row in logits_rows, in that order.
    """

    input_ids: np.ndarray  # [N] int64
    position_ids: np.ndarray  # [N] int64
    query_start: np.ndarray  # [B + 1] int64
    context_lens: np.ndarray  # [B] int64
    block_tables: np.ndarray  # [B, max_blocks] int32, -1 past a row's blocks
    slot_mapping: np.ndarray  # [N] int64
    logits_rows: np.ndarray  # [M] int64, rows whose last token's logits are returned
    block_size: int
    seq_ids: list[str] = field(default_factory=list)  # row r's request id (stable while it runs)
    freed_seq_ids: list[str] = field(default_factory=list)  # see SchedulerOutput.freed

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.context_lens.shape[0])

    @property
    def logits_indices(self) -> np.ndarray:
        """Indices into the flat tokens of the tokens whose logits are returned."""
        return self.query_start[self.logits_rows + 1] - 1

    @property
    def is_decode(self) -> bool:
        """Every row computes exactly one token."""
        return self.num_tokens == self.num_rows
