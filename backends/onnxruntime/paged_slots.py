"""Continuous batching on ONNX Runtime: the gqa-v1 export over one cache row per sequence.

The GroupQueryAttention graph (export/onnx_gqa.py) reads and appends to caller-owned buffers
[rows, n_head, capacity, head_dim] bound as both past and present, so the cache is written in
place, never re-copied, and rows of one call may hold different lengths. What it cannot do is
address blocks: a sequence's cache is one contiguous row. So this runner's kv layout is
"slots": a request (PagedStep.seq_ids) gets the lowest free row when it first runs and keeps it
until the scheduler reports it freed (PagedStep.freed_seq_ids); there is no prefix cache.

How a step runs (measured choices, README "Continuous batching"):
- the decode rows (one new token each) run as one call over the contiguous row range that
  holds them; rows in the range that are not in this call are idle (0 new tokens);
- prefill chunks run in calls of neighbouring rows whose padding stays small. The graph pads
  every row of a call (idle rows in its range included) to the call's longest chunk, so a
  200-token chunk beside decodes or a 20-token chunk would compute mostly padding; but one
  short prompt per call streams all the weights for little work (16 prompts of 32 tokens:
  567 ms in 16 calls against 287 ms in one).
"""
from __future__ import annotations

import numpy as np

from mini_engine.errors import MiniEngineError

# A prefill call may compute at most this much padding over its real tokens (plus a few rows' worth).
PAD_RATIO, PAD_SLACK = 1.25, 64


class PagedSlots:
    """Mixed into OrtRunner: the paged contract over the gqa-v1 graph."""

    def _load_gqa(self, export) -> None:
        from mini_engine_export.onnx_gqa import CONTRACT

        from . import session as s

        self.gqa_session = s.create_session(export.model_file, self.session_opts, ["CPUExecutionProvider"], [{}])
        meta = self.gqa_session.get_modelmeta().custom_metadata_map
        got = meta.get("kv_cache_contract") or meta.get("contract")
        n_layer = self.config.model.config.n_layer
        names = [i.name for i in self.gqa_session.get_inputs()]
        want = ["input_ids", "position_ids", "seqlens_k", "total_sequence_length", "query_lens"]
        if names[:5] != want or len(names) != 5 + 2 * n_layer or (got is not None and got != CONTRACT):
            raise MiniEngineError(f"the export in '{export.directory}' does not implement the {CONTRACT} contract "
                                  f"(inputs {names[:5]}, metadata {got}); re-export with "
                                  f"`mini-engine export onnx --kv-cache gqa --force`")

    def _allocate_kv_pool_impl(self, num_blocks: int, block_size: int, max_num_seqs: int) -> None:
        from mini_engine_export.onnx_gqa import GqaKV

        cfg = self.config.model.config
        self.capacity = cfg.n_positions
        # A row per running sequence; the block pool (the scheduler's accounting) caps their tokens.
        rows = max_num_seqs or max(1, num_blocks * block_size // self.capacity)
        # np.zeros maps pages on first touch: resident memory grows with the rows in use.
        self.kv = GqaKV.allocate(cfg, rows, self.capacity)
        self.slot_of: dict[str, int] = {}
        self.free_slots = list(range(rows))
        self.slot_len = np.zeros(rows, np.int64)  # cached tokens per row

    def _free_kv_pool_impl(self) -> None:
        self.kv = None
        self.slot_of, self.free_slots = {}, []

    def _execute_paged_impl(self, step) -> np.ndarray:
        if self.gqa_session is None:
            raise MiniEngineError(f"continuous batching is unavailable here: {self.paged_reason}")
        # A step that raises leaves the rows' bookkeeping as it found it, so that the engine can
        # rerun a subset of the step's rows (it isolates a failing request that way).
        saved = (self.slot_len.copy(), dict(self.slot_of), list(self.free_slots))
        try:
            return self._run_step(step)
        except BaseException:
            self.slot_len, self.slot_of, self.free_slots = saved
            raise

    def _run_step(self, step) -> np.ndarray:
        for sid in step.freed_seq_ids:
            slot = self.slot_of.pop(sid, None)
            if slot is not None:
                self.slot_len[slot] = 0
                self.free_slots.append(slot)
        self.free_slots.sort()
        n_new = np.diff(step.query_start)
        slots = np.empty(step.num_rows, np.int64)
        for r, sid in enumerate(step.seq_ids):
            slot = self.slot_of.get(sid)
            if slot is None:
                if step.context_lens[r]:
                    raise MiniEngineError(f"request {sid} has {step.context_lens[r]} cached tokens but no cache row")
                if not self.free_slots:
                    raise MiniEngineError("no free cache row: more running sequences than the pool's rows")
                slot = self.slot_of[sid] = self.free_slots.pop(0)
            elif self.slot_len[slot] != step.context_lens[r]:
                raise MiniEngineError(f"request {sid}: the plan says {step.context_lens[r]} cached tokens, its cache "
                                      f"row holds {self.slot_len[slot]}")
            slots[r] = slot
        logits = np.empty((step.num_rows, self.config.model.config.vocab_size), np.float32)
        decode = np.flatnonzero(n_new == 1)
        if decode.size:
            logits[decode] = self._run_rows(step, decode, slots)
        for group in prefill_groups(np.flatnonzero(n_new > 1), slots, n_new, self.slot_len, self.capacity):
            logits[group] = self._run_rows(step, group, slots)
        return logits[step.logits_rows]

    def _run_rows(self, step, rows: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """One graph call for `rows` of the step, over the cache rows from their lowest to highest slot."""
        from mini_engine_export.onnx_gqa import run_step

        lo, hi = int(slots[rows].min()), int(slots[rows].max()) + 1
        width = hi - lo
        seq = int(max(step.query_start[r + 1] - step.query_start[r] for r in rows))
        ids = np.zeros((width, seq), np.int64)
        pos = np.zeros((width, seq), np.int64)
        counts = np.zeros(width, np.int32)
        past = self.slot_len[lo:hi].copy()
        for r in rows:
            b = slots[r] - lo
            a, z = step.query_start[r], step.query_start[r + 1]
            ids[b, :z - a] = step.input_ids[a:z]
            pos[b, :z - a] = step.position_ids[a:z]
            counts[b] = z - a
            past[b] = step.context_lens[r]
        seqlens = np.where(counts > 0, past + counts - 1, np.maximum(past - 1, 0)).astype(np.int32)
        feeds = {"input_ids": ids, "position_ids": pos, "seqlens_k": seqlens,
                 "total_sequence_length": np.array(self.capacity, np.int32), "query_lens": counts}
        out = run_step(self.gqa_session, self.kv, feeds, lo)
        self.slot_len[slots[rows]] = past[slots[rows] - lo] + counts[slots[rows] - lo]  # the next call's ranges see it
        return out[slots[rows] - lo]


def prefill_groups(rows: np.ndarray, slots: np.ndarray, n_new: np.ndarray, slot_len: np.ndarray,
                   capacity: int) -> list[np.ndarray]:
    """Rows with chunks, grouped into calls over neighbouring cache rows with little padding.

    The graph pads every row of a call's range to the longest chunk, idle rows included, and
    refuses a row whose cached length plus that padded chunk exceeds the capacity: a group
    grows only while every row of its range stays within it.
    """
    order = rows[np.argsort(slots[rows])]
    groups: list[list[int]] = []
    for r in order:
        if groups:
            g = groups[-1] + [r]
            lo, hi = slots[g[0]], slots[g[-1]] + 1
            seq = int(n_new[g].max())
            real = int(n_new[g].sum())
            fits = int(slot_len[lo:hi].max()) + seq <= capacity  # slot_len: cached lengths before the step
            if fits and (hi - lo) * seq <= PAD_RATIO * real + PAD_SLACK:
                groups[-1] = g
                continue
        groups.append([r])
    return [np.array(g) for g in groups]
