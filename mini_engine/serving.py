"""An Engine behind one front: many callers, one request each, batched for the runner.

- "forward": score a prompt (one forward pass; the next token's top-k) behind the dynamic
  batcher, Engine.score_batch.
- "generate": continuous batching (AsyncEngine over the scheduler) when the runner has the
  paged contract; otherwise the same as "static".
- "static": the baseline of today's batcher: whole generations batched together with left
  padding, Engine.generate_batch. Finished rows leave the step and their caller is answered
  at once, but nobody joins a batch once it started.
- "naive": one request at a time without a KV cache (Engine.generate_uncached), behind the
  batcher with max_batch_size 1.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Any

from .batcher import Batcher, RequestFuture, RequestTimeout
from .config import BatchingConfig
from .errors import ConfigError
from .sampling import SamplingParams
from .sequence import Completion, Sequence

MODES = ("forward", "generate", "static", "naive")


class BatchedEngine:
    """Thread-safe front of an Engine (which is not): submit() from any thread or task.

    Every request of one BatchedEngine shares `params` (generate) or `top_k` (forward),
    so any batch of them is a valid engine batch.
    """

    def __init__(self, engine, mode: str = "generate", batching: BatchingConfig | None = None,
                 params: SamplingParams | None = None, top_k: int = 5):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{mode}'")
        self._restore_seqs = None
        if batching is not None and mode == "generate" and engine.continuous:
            # A benchmark's batch size is continuous batching's max_num_seqs (while this front is open).
            self._restore_seqs = engine.scheduler.config.max_num_seqs
            engine.set_max_num_seqs(batching.max_batch_size)
        batching = batching or engine.config.batching
        self.batching = batching
        if mode == "naive" and batching.max_batch_size != 1:
            batching = dataclasses.replace(batching, max_batch_size=1, preferred_batch_sizes=[])
        self.engine, self.mode, self.top_k = engine, mode, top_k
        self.params = params or engine.sampling_params()
        self._ids = itertools.count()
        self.front = None
        if mode == "generate" and engine.continuous:
            from .async_engine import AsyncEngine

            self.front = AsyncEngine(engine)
            self.batcher = None
            self._stats0 = engine.stats()
            return
        if mode == "generate":
            mode = "static"  # the runner has only the static contract
        execute = {"forward": self._score, "static": self._generate, "naive": self._generate_naive}[mode]
        self.batcher = Batcher(execute, batching, answers_early=mode == "static", name=f"engine-{mode}")

    # ----- public API ------------------------------------------------------------
    @property
    def continuous(self) -> bool:
        return self.front is not None

    def _expire_after(self, future: RequestFuture, request_id: str, timeout_ms: float) -> None:
        """Continuous batching's form of the batcher's timeout: a request not answered in time is
        aborted (its KV freed) and answered with RequestTimeout, queued or running."""
        import threading
        from concurrent.futures import InvalidStateError

        def expire():
            if future.done():
                return
            self.front.abort(request_id)
            try:
                future.set_exception(RequestTimeout(f"request not answered within {timeout_ms:g} ms"))
            except InvalidStateError:
                pass  # answered meanwhile

        timer = threading.Timer(timeout_ms / 1e3, expire)
        timer.daemon = True
        timer.start()
        future.add_done_callback(lambda _f: timer.cancel())

    def submit(self, prompt: str | list[int], timeout_ms: float | None = None,
               max_new_tokens: int | None = None) -> RequestFuture:
        """Tokenize in the caller's thread (bad prompts fail here), then queue the request.

        `prompt` may be token ids; `max_new_tokens` overrides the shared params for this request.
        """
        if self.front is not None:
            params = self.params if max_new_tokens is None else dataclasses.replace(self.params, max_new_tokens=max_new_tokens)
            if params.seed is not None:  # as static batching seeds its rows: seed + request index
                params = params.for_prompt(next(self._ids))
            future = RequestFuture()
            future.ttft_from_submit = True
            stream = self.front.submit(prompt, params, future=future)
            timeout = self.batching.timeout_ms if timeout_ms is None else timeout_ms
            if timeout:
                self._expire_after(future, stream.request_id, timeout)
            return future
        params = self.params if max_new_tokens is None else dataclasses.replace(self.params, max_new_tokens=max_new_tokens)
        if self.mode == "forward":
            params = dataclasses.replace(params, max_new_tokens=1, min_tokens=0)  # scoring reads one next token
        ids = self.engine.encode_prompt(prompt, params) if isinstance(prompt, str) else \
            self.engine.check_prompt_ids(prompt, params)
        seq = Sequence(next(self._ids), prompt if isinstance(prompt, str) else "", ids, max_new_tokens=max_new_tokens)
        return self.batcher.submit(_Job(seq, time.perf_counter()), timeout_ms)

    async def submit_async(self, prompt: str, timeout_ms: float | None = None) -> Any:
        import asyncio

        return await asyncio.wrap_future(self.submit(prompt, timeout_ms))

    def stats(self) -> dict[str, Any]:
        if self.front is None:
            return self.batcher.stats()
        # The batcher's names, from the engine's counters since this front opened.
        now, was = self.engine.stats(), self._stats0
        steps = now["steps"] - was["steps"]
        rows = now["rows_stepped"] - was["rows_stepped"]
        return {"mini_engine:mean_batch_size": rows / steps if steps else 0.0,
                "mini_engine:num_batches_total": steps} | {f"mini_engine:{k}": v for k, v in now.items()}

    def close(self, drain: bool = True) -> None:
        if self.front is not None:
            if drain:
                while not self.front.idle and self.front.is_alive:
                    time.sleep(0.005)
            self.front.close()
            if self._restore_seqs is not None:
                self.engine.set_max_num_seqs(self._restore_seqs)
            return
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
