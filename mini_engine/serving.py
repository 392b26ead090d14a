"""An Engine behind the dynamic batcher: many callers, one request each, batched for the runner.

Two workloads share the same Batcher:
- "forward": score a prompt (one forward pass; the next token's top-k), Engine.score_batch;
- "generate": whole generations batched together with left padding, Engine.generate_batch.
  Finished rows leave the step (their KV slot is skipped) and their caller is answered
  at once, while the rest of the batch goes on.
- "naive" is the baseline for comparisons: one request at a time without a KV cache
  (Engine.generate_uncached), behind the same batcher with max_batch_size 1.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

from .batcher import Batcher, RequestFuture
from .config import BatchingConfig
from .errors import ConfigError
from .sampling import SamplingParams
from .sequence import Completion, Sequence

MODES = ("forward", "generate", "naive")


class BatchedEngine:
    """Thread-safe front of an Engine (which is not): submit() from any thread or task.

    Every request of one BatchedEngine shares `params` (generate) or `top_k` (forward),
    so any batch of them is a valid engine batch.
    """

    def __init__(self, engine, mode: str = "generate", batching: BatchingConfig | None = None,
                 params: SamplingParams | None = None, top_k: int = 5):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        batching = batching or engine.config.batching
        if mode == "naive" and batching.max_batch_size != 1:
            batching = dataclasses.replace(batching, max_batch_size=1, preferred_batch_sizes=[])
        self.engine, self.mode, self.top_k = engine, mode, top_k
        self.params = params or engine.sampling_params()
        self._ids = itertools.count()
        execute = {"forward": self._score, "generate": self._generate, "naive": self._generate_naive}[mode]
        self.batcher = Batcher(execute, batching, answers_early=mode == "generate", name=f"engine-{mode}")

    # ----- public API ------------------------------------------------------------
    def submit(self, prompt: str, timeout_ms: float | None = None) -> RequestFuture:
        """Tokenize in the caller's thread (bad prompts fail here), then queue the request."""
        ids = self.engine.encode_prompt(prompt, self.params)
        return self.batcher.submit(_Job(Sequence(next(self._ids), prompt, ids), time.perf_counter()), timeout_ms)

    async def submit_async(self, prompt: str, timeout_ms: float | None = None) -> Any:
        import asyncio

        return await asyncio.wrap_future(self.submit(prompt, timeout_ms))

    def stats(self) -> dict[str, Any]:
        return self.batcher.stats()

    def close(self, drain: bool = True) -> None:
        self.batcher.close(drain)

    def __enter__(self) -> "BatchedEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- batch executors (run on the batcher's worker thread) --------------------
    def _score(self, jobs: list[_Job]):
        return self.engine.score_batch([j.seq for j in jobs], self.top_k)

    def _generate(self, jobs: list[_Job], answer):
        seqs = [j.seq for j in jobs]

        def finished(row: int, completion: Completion) -> None:
            self._observe(jobs[row], seqs[row], completion)
            answer(row, completion)

        return self.engine.generate_batch(seqs, self.params, on_finish=finished)

    def _generate_naive(self, jobs: list[_Job]):
        out = []
        for j in jobs:
            completion = self.engine.generate_uncached(j.seq, self.params)
            self._observe(j, j.seq, completion)
            out.append(completion)
        return out

    def _observe(self, job: _Job, seq: Sequence, c: Completion) -> None:
        """vLLM's generation metrics; TTFT counts from submit(), so queueing is included."""
        stats = self.batcher.stats_
        stats.inc("generation_tokens_total", len(c.token_ids))
        stats.observe("time_to_first_token_ms", (seq.first_token_s - job.submitted_s) * 1e3)
        if len(c.token_ids) > 1:
            stats.observe("time_per_output_token_ms", c.tpot_ms)
        for a, b in zip(c.token_times_ms, c.token_times_ms[1:]):
            stats.observe("inter_token_latency_ms", b - a)


@dataclasses.dataclass
class _Job:
    seq: Sequence
    submitted_s: float  # perf_counter() at submit(): TTFT is what the caller waits
