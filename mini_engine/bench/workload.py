"""Load generators: single-sample requests through the dynamic batcher, as real users send them.

Closed loop: C clients, each sending its next request when its last one returns.
Open loop: Poisson arrivals at R requests/s, whether or not earlier ones returned,
so queueing delay grows when R exceeds what the target can serve.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..batcher import QueueFullError
from ..errors import MiniEngineError

# Common English words that GPT-2's tokenizer keeps as one token each (with the leading
# space), so a prompt of N of them is exactly N tokens.
_WORDS = (" the of and to in is that for it as was with be by on not he this are or his from at which"
          " but have an they you were her she there been one all we their has would when if so no will"
          " more can out them who some time people new year up about other into very what could").split(" ")[1:]


def make_prompts(n: int, length: int, seed: int, tokenizer) -> list[str]:
    """n distinct prompts of exactly `length` tokens each."""
    rng = np.random.default_rng(seed)
    prompts = ["".join(" " + _WORDS[i] for i in rng.integers(0, len(_WORDS), size=length)) for _ in range(n)]
    for p in prompts:
        got = len(tokenizer.encode(p))
        if got != length:
            raise MiniEngineError(f"internal: a {length}-word prompt tokenized to {got} tokens: {p!r}")
    return prompts


@dataclass
class Record:
    """One request as its caller saw it."""

    latency_ms: float  # submit -> result, queueing included
    queue_ms: float
    compute_ms: float
    batch_size: int
    tokens: int  # prompt tokens scored (forward) or tokens generated (generate)
    ttft_ms: float | None = None  # submit -> first token (generate)
    token_gaps_ms: list[float] = field(default_factory=list)  # inter-token latencies (generate)


@dataclass
class Run:
    records: list[Record]
    elapsed_s: float  # first submit -> last answer
    rejected: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


SubmitFn = Callable[[int], Future]
ToRecord = Callable[[Future, Any, float], Record]


def closed_loop(submit: SubmitFn, to_record: ToRecord, requests: int, concurrency: int,
                on_answer: Callable[[], None] | None = None) -> Run:
    lock = threading.Lock()
    next_index = iter(range(requests))
    run = Run([], 0.0)
    clients = min(concurrency, requests)
    # Clients start together: started one by one, the first few would reach an idle
    # runner alone and the opening batch would measure thread start-up, not the load.
    start = threading.Barrier(clients)

    def client():
        start.wait()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            _one(submit, to_record, i, run, lock)
            if on_answer:
                on_answer()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run.elapsed_s = time.perf_counter() - t0
    return run


def open_loop(submit: SubmitFn, to_record: ToRecord, requests: int, rate: float, seed: int = 0) -> Run:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=requests)
    lock = threading.Lock()
    run = Run([], 0.0)
    pending: list[tuple[Future, float, int]] = []
    done_at: dict[int, float] = {}
    t0 = time.perf_counter()
    next_s = t0
    for i in range(requests):
        next_s += gaps[i]
        time.sleep(max(0.0, next_s - time.perf_counter()))
        start = time.perf_counter()
        try:
            f = submit(i)
        except QueueFullError:
            run.rejected += 1
            continue
        f.add_done_callback(lambda _f, i=i: done_at.__setitem__(i, time.perf_counter()))
        pending.append((f, start, i))
    last = t0
    for f, start, i in pending:
        try:
            result = f.result()
        except Exception as e:  # noqa: BLE001 - counted, reported, and the run goes on
            run.failed += 1
            run.errors.append(f"{type(e).__name__}: {e}")
            continue
        end = done_at.get(i, time.perf_counter())
        last = max(last, end)
        with lock:
            run.records.append(to_record(f, result, (end - start) * 1e3))
    run.elapsed_s = last - t0
    return run


def _one(submit: SubmitFn, to_record: ToRecord, i: int, run: Run, lock: threading.Lock) -> None:
    start = time.perf_counter()
    try:
        f = submit(i)
        result = f.result()
    except QueueFullError:
        with lock:
            run.rejected += 1
        return
    except Exception as e:  # noqa: BLE001 - counted, reported, and the run goes on
        with lock:
            run.failed += 1
            run.errors.append(f"{type(e).__name__}: {e}")
        return
    latency_ms = (time.perf_counter() - start) * 1e3
    with lock:
        run.records.append(to_record(f, result, latency_ms))


def forward_record(future, score, latency_ms: float) -> Record:
    return Record(latency_ms, future.queue_ms, future.compute_ms, future.batch_size, len(score.prompt_token_ids))


def generate_record(future, completion, latency_ms: float) -> Record:
    times = completion.token_times_ms
    # Continuous batching times a request from its arrival; the batcher from its batch's start.
    ttft = completion.ttft_ms if getattr(future, "ttft_from_submit", False) else future.queue_ms + completion.ttft_ms
    return Record(latency_ms, future.queue_ms, future.compute_ms, future.batch_size, len(completion.token_ids),
                  ttft_ms=ttft,
                  token_gaps_ms=[b - a for a, b in zip(times, times[1:])])
