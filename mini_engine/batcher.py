"""The dynamic batcher: single requests from many threads in, batches out to one worker.

Backend-agnostic (no deep-learning import): the batcher calls an `execute`
function with a list of request payloads and hands each caller its own result.
Settings follow Triton's dynamic batcher (`mini_engine.config.BatchingConfig`):

- a batch is sent when it reaches `max_batch_size`, when a preferred batch size
  can be formed, or when the oldest queued request has waited
  `max_queue_delay_ms` (0: send whatever is queued as soon as the worker is free);
- a full queue (`max_queue_size`) rejects a new request at once (QueueFullError);
- a request older than its `timeout_ms` is answered with RequestTimeout and never runs;
- `preserve_ordering` answers requests in arrival order.

One worker thread is the only caller of `execute`, so the thing it drives (an
Engine and its runner) need not be thread-safe.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .config import BatchingConfig
from .errors import MiniEngineError
from .stats import ServingStats

#: execute(payloads) -> one result per payload (an exception instance fails just that request).
#: With answers_early=True: execute(payloads, answer) where answer(i, result) may answer row i
#: before the batch ends (a generation that finished early).
ExecuteFn = Callable[..., Sequence[Any]]


class QueueFullError(MiniEngineError):
    """The batcher's queue holds max_queue_size requests; retry later or raise batching.max_queue_size."""


class RequestTimeout(MiniEngineError):
    """The request waited longer than its timeout_ms and was not run."""


class BatcherClosed(MiniEngineError):
    """The batcher was shut down before the request ran."""


class RequestFuture(Future):
    """A Future that also says how the request was served (set before its result)."""

    def __init__(self):
        super().__init__()
        self.queue_ms: float | None = None  # enqueue -> its batch started
        self.compute_ms: float | None = None  # its batch started -> its answer
        self.batch_size: int | None = None


@dataclass
class _Request:
    seq: int
    payload: Any
    future: RequestFuture
    enqueued_s: float
    deadline_s: float | None
    outcome: tuple[bool, Any] | None = field(default=None, repr=False)  # (ok, value)


class Batcher:
    """Groups single requests into batches for `execute`; see the module docstring.

    Use as a context manager, or call close(). submit() is thread-safe and
    returns a RequestFuture; submit_async() is the asyncio form.
    """

    def __init__(self, execute: ExecuteFn, config: BatchingConfig | None = None, *,
                 answers_early: bool = False, name: str = "batcher"):
        self.config = config or BatchingConfig()
        self._execute = execute
        self._answers_early = answers_early
        self.stats_ = ServingStats()
        for counter in ("num_requests_total", "num_requests_success_total", "num_requests_failed_total",
                        "num_requests_rejected_total", "num_requests_timeout_total",
                        "num_requests_cancelled_total", "num_batches_total"):
            self.stats_.inc(counter, 0)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the worker waits here
        self._expiry = threading.Condition(self._lock)  # the reaper waits here
        self._queue: deque[_Request] = deque()
        self._next_seq = 0
        self._closed = False
        self._drain = True
        # preserve_ordering: answers wait here until every earlier request is answered.
        self._order_lock = threading.Lock()
        self._held: dict[int, _Request] = {}
        self._next_answer = 0
        self._worker = threading.Thread(target=self._work_loop, name=f"{name}-worker", daemon=True)
        self._reaper = threading.Thread(target=self._reap_loop, name=f"{name}-reaper", daemon=True)
        self._worker.start()
        self._reaper.start()

    # ----- public API ------------------------------------------------------------
    def submit(self, payload: Any, timeout_ms: float | None = None) -> RequestFuture:
        """Queue one request; raises QueueFullError at once when the queue is full.

        timeout_ms overrides batching.timeout_ms for this request (0 = never expires).
        """
        timeout_ms = self.config.timeout_ms if timeout_ms is None else timeout_ms
        if timeout_ms < 0:
            raise MiniEngineError(f"timeout_ms must be >= 0, got {timeout_ms}")
        now = time.perf_counter()
        future = RequestFuture()
        with self._lock:
            if self._closed:
                raise BatcherClosed("the batcher is closed; create a new one")
            if len(self._queue) >= self.config.max_queue_size:
                self.stats_.inc("num_requests_rejected_total")
                raise QueueFullError(
                    f"request rejected: the queue already holds {self.config.max_queue_size} requests "
                    f"(batching.max_queue_size); retry later or raise the limit")
            deadline = now + timeout_ms / 1e3 if timeout_ms else None
            self._queue.append(_Request(self._next_seq, payload, future, now, deadline))
            self._next_seq += 1
            self.stats_.inc("num_requests_total")
            self._work.notify()
            if deadline is not None:
                self._expiry.notify()
        return future

    async def submit_async(self, payload: Any, timeout_ms: float | None = None) -> Any:
        """submit() for asyncio: awaits the result (cancelling the task cancels a queued request)."""
        return await asyncio.wrap_future(self.submit(payload, timeout_ms))

    def stats(self) -> dict[str, Any]:
        """Counters, batch-size histogram and queue/compute time summaries (`mini_engine:*`)."""
        with self._lock:
            waiting = len(self._queue)
        return self.stats_.snapshot(num_requests_waiting=waiting)

    def close(self, drain: bool = True) -> None:
        """Stop accepting requests; drain=True runs what is queued, False fails it with BatcherClosed."""
        with self._lock:
            if self._closed and not self._worker.is_alive():
                return
            self._closed = True
            self._drain = drain
            dropped = [] if drain else list(self._queue)
            if not drain:
                self._queue.clear()
            self._work.notify_all()
            self._expiry.notify_all()
        for r in dropped:
            self._answer(r, False, BatcherClosed("the batcher was closed before this request ran"))
        self._worker.join()
        self._reaper.join()

    def __enter__(self) -> "Batcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- forming batches -----------------------------------------------------------
    def _work_loop(self) -> None:
        while True:
            batch, expired = self._next_batch()
            self._expire(expired)
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _next_batch(self) -> tuple[list[_Request] | None, list[_Request]]:
        """Block until a batch is due; returns (batch, expired) or (None, expired) at shutdown."""
        cfg = self.config
        delay_s = cfg.max_queue_delay_ms / 1e3
        with self._lock:
            while True:
                now = time.perf_counter()
                expired = self._take_expired(now)
                if expired:
                    return [], expired
                if not self._queue:
                    if self._closed:
                        return None, []
                    self._work.wait()
                    continue
                n = len(self._queue)
                waited_enough = now >= self._queue[0].enqueued_s + delay_s
                preferred = [p for p in cfg.preferred_batch_sizes if p <= n]
                if n >= cfg.max_batch_size or waited_enough or preferred or self._closed:
                    if n >= cfg.max_batch_size:
                        size = cfg.max_batch_size
                    elif preferred and not waited_enough and not self._closed:
                        size = max(preferred)
                    else:
                        size = n
                    return [self._queue.popleft() for _ in range(size)], []
                wake = self._queue[0].enqueued_s + delay_s
                deadlines = [r.deadline_s for r in self._queue if r.deadline_s is not None]
                self._work.wait(max(0.0, min([wake] + deadlines) - now))

    def _take_expired(self, now: float) -> list[_Request]:
        """Remove and return queued requests past their deadline (call with the lock held)."""
        if not any(r.deadline_s is not None and r.deadline_s <= now for r in self._queue):
            return []
        keep, expired = deque(), []
        for r in self._queue:
            (expired if r.deadline_s is not None and r.deadline_s <= now else keep).append(r)
        self._queue = keep
        return expired

    def _reap_loop(self) -> None:
        """Answer expired requests while the worker is busy running a batch."""
        with self._lock:
            while not self._closed or self._queue:
                now = time.perf_counter()
                expired = self._take_expired(now)
                if expired:
                    self._lock.release()
                    try:
                        self._expire(expired)
                    finally:
                        self._lock.acquire()
                    continue
                deadlines = [r.deadline_s for r in self._queue if r.deadline_s is not None]
                if self._closed and not deadlines:
                    return
                self._expiry.wait(min(deadlines) - now if deadlines else None)

    def _expire(self, expired: list[_Request]) -> None:
        for r in expired:
            self.stats_.inc("num_requests_timeout_total")
            waited = (time.perf_counter() - r.enqueued_s) * 1e3
            self._answer(r, False, RequestTimeout(f"request timed out after {waited:.0f} ms in the queue "
                                                  f"(batching.timeout_ms); it was not run"))

    # ----- running a batch -----------------------------------------------------------
    def _run(self, batch: list[_Request]) -> None:
        # A caller may have cancelled its future while queued: it never runs.
        live = []
        for r in batch:
            if r.future.set_running_or_notify_cancel():
                live.append(r)
            else:
                self.stats_.inc("num_requests_cancelled_total")
                self._answer(r, None, None)
        if not live:
            return
        start = time.perf_counter()
        for r in live:
            r.future.queue_ms = (start - r.enqueued_s) * 1e3
            r.future.batch_size = len(live)
            self.stats_.observe("request_queue_time_ms", r.future.queue_ms)
        self.stats_.inc("num_batches_total")
        self.stats_.observe_batch(len(live))
        payloads = [r.payload for r in live]
        answered: set[int] = set()

        def answer(i: int, value: Any) -> None:
            if i not in answered:
                answered.add(i)
                self._finish(live[i], value, start)

        try:
            results = (self._execute(payloads, answer) if self._answers_early
                       else self._execute(payloads))
            if results is None and self._answers_early:
                results = [None] * len(live)
            if len(results) != len(live):
                raise MiniEngineError(f"the batch executor returned {len(results)} results "
                                      f"for {len(live)} requests")
        except BaseException as e:  # noqa: BLE001 - the error belongs to this batch's callers
            for i in range(len(live)):
                answer(i, e)
            if not isinstance(e, Exception):
                raise
            return
        for i, value in enumerate(results):
            answer(i, value)

    def _finish(self, r: _Request, value: Any, start: float) -> None:
        now = time.perf_counter()
        r.future.compute_ms = (now - start) * 1e3
        self.stats_.observe("request_compute_time_ms", r.future.compute_ms)
        self.stats_.observe("e2e_request_latency_ms", (now - r.enqueued_s) * 1e3)
        failed = isinstance(value, BaseException)
        self.stats_.inc("num_requests_failed_total" if failed else "num_requests_success_total")
        self._answer(r, not failed, value)

    def _answer(self, r: _Request, ok: bool | None, value: Any) -> None:
        """Resolve r's future (ok=None: already cancelled), in arrival order if asked."""
        if not self.config.preserve_ordering:
            _resolve(r, ok, value)
            return
        r.outcome = (ok, value)
        # Resolving under the order lock keeps answers in order across the worker and
        # reaper threads; it never holds the queue lock, so callbacks may submit().
        with self._order_lock:
            self._held[r.seq] = r
            while self._next_answer in self._held:
                nxt = self._held.pop(self._next_answer)
                self._next_answer += 1
                _resolve(nxt, *nxt.outcome)


def _resolve(r: _Request, ok: bool | None, value: Any) -> None:
    if ok is None or r.future.done():
        return
    if ok:
        r.future.set_result(value)
    else:
        r.future.set_exception(value)
