"""The engine behind a thread: many callers, one engine loop, a token stream per request.

One loop thread owns the Engine (and so the runner): it takes new requests and aborts from an
inbox, runs `Engine.step()` while there is work, and hands each request's increments to its
stream. Callers submit from any thread or asyncio task. A stream is consumed either as an
async iterator (`async for out in stream`) or a blocking one (`for out in stream`); leaving
an async iteration early (a client that went away) aborts the request and frees its KV.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, AsyncIterator, Iterator, Sequence

from .errors import MiniEngineError
from .sampling import SamplingParams
from .sequence import Completion, RequestOutput

_END = object()


class EngineDeadError(MiniEngineError):
    """The engine loop stopped on an error; requests in flight got it too."""


class RequestStream:
    """Increments of one request, in order; the last one has `finished` and the Completion."""

    def __init__(self, request_id: str, owner: "AsyncEngine", loop: asyncio.AbstractEventLoop | None,
                 future: Future | None = None):
        self.request_id = request_id
        self._owner = owner
        self._loop = loop
        self._future = future
        self._aq: asyncio.Queue | None = asyncio.Queue() if loop is not None and future is None else None
        self._q: queue.SimpleQueue | None = queue.SimpleQueue() if loop is None and future is None else None
        self.completion: Completion | None = None
        self.finished = False

    # engine thread -> consumer
    def _put(self, item: Any) -> None:
        if self._future is not None:
            self._resolve(item)
        elif self._aq is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, item)
            except RuntimeError:
                pass  # the caller's event loop is closed: nobody is listening any more
        else:
            self._q.put(item)

    def _resolve(self, item: Any) -> None:
        """Future mode: only the end matters (the batcher-style callers of BatchedEngine)."""
        f = self._future
        if f.done():
            return  # cancelled by its caller (its request was aborted then)
        if isinstance(item, RequestOutput):
            if item.finished:
                c = item.completion
                f.queue_ms, f.compute_ms, f.batch_size = c.queue_ms, c.total_ms - c.queue_ms, None
                f.set_result(c)
        elif isinstance(item, BaseException):
            f.set_exception(item)
        else:
            f.set_exception(MiniEngineError(f"request {self.request_id} was aborted"))

    def _record(self, item: Any) -> Any:
        if isinstance(item, RequestOutput) and item.finished:
            self.finished, self.completion = True, item.completion
        return item

    # consumers
    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self._aq is None:
            raise MiniEngineError("this stream was opened outside an event loop; iterate it with a plain for")
        try:
            while True:
                item = await self._aq.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self._record(item)
                if self.finished:
                    return
        finally:
            if not self.finished:
                self._owner.abort(self.request_id)

    def __iter__(self) -> Iterator[RequestOutput]:
        if self._q is None:
            raise MiniEngineError("this stream belongs to an event loop; iterate it with async for")
        try:
            while not self.finished:
                item = self._q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield self._record(item)
        finally:
            if not self.finished:
                self._owner.abort(self.request_id)

    async def result(self) -> Completion:
        """Wait for the whole completion (async streams)."""
        async for _ in self:
            pass
        return self._final()

    def result_sync(self) -> Completion:
        for _ in self:
            pass
        return self._final()

    def _final(self) -> Completion:
        if self.completion is None:
            raise MiniEngineError(f"request {self.request_id} ended without a completion (aborted)")
        return self.completion


class AsyncEngine:
    """Thread-safe front of an Engine running continuous batching on its own loop thread."""

    def __init__(self, engine, name: str = "engine-loop"):
        if not engine.continuous:
            raise MiniEngineError(f"AsyncEngine needs continuous batching: {engine.static_reason}")
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._closed = False
        self._lock = threading.Lock()  # submit's check-and-enqueue against close and the loop's death
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # ----- callers (any thread) ------------------------------------------------------------
    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               request_id: str | None = None, future: Future | None = None) -> RequestStream:
        """Queue a request; bad prompts fail here, in the caller's thread, with one clear error.

        Called inside a running event loop the stream is async, otherwise blocking; with
        `future`, nothing is streamed and the future gets the Completion.
        """
        arrival = time.perf_counter()  # TTFT and queue time count from here
        engine = self.engine
        params = params or engine.sampling_params()
        ids = engine.encode_prompt(prompt, params) if isinstance(prompt, str) else engine.check_prompt_ids(prompt, params)
        engine.scheduler.check_fits(len(ids), params.max_new_tokens)
        rid = request_id or f"async-{next(self._ids)}-{id(self):x}"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        stream = RequestStream(rid, self, loop, future)
        with self._lock:
            self._check_alive()
            self._inbox.put(("add", rid, ids, params, prompt if isinstance(prompt, str) else None, stream, arrival))
        if future is not None:
            future.add_done_callback(lambda f: self.abort(rid) if f.cancelled() else None)
        self._wake.set()
        return stream

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Completion:
        """Blocking: submit and wait for the completion."""
        return self.submit(prompt, params).result_sync()

    def abort(self, request_id: str) -> None:
        if not self._closed:
            self._inbox.put(("abort", request_id))
            self._wake.set()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._closed

    def stats(self) -> dict[str, Any]:
        return self.engine.stats() | {"in_flight": len(self._streams)}

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop; requests still in flight or queued end (their streams end, unfinished)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def idle(self) -> bool:
        """Nothing queued, in flight, or running."""
        return self._inbox.empty() and not self._streams and not self.engine.has_unfinished_requests()

    def __enter__(self) -> "AsyncEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine loop stopped: {self.error}")
        if self._closed:
            raise MiniEngineError("the engine is closed")

    # ----- the loop thread -----------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._closed:
                self._drain_inbox()
                if not engine.has_unfinished_requests():
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                for out in engine.step():
                    stream = self._streams.get(out.request_id)
                    if stream is None:
                        continue
                    stream._put(out)
                    if out.finished:
                        del self._streams[out.request_id]
        except BaseException as e:  # noqa: BLE001 - every waiting caller must hear about it
            with self._lock:
                self.error = e
            err = EngineDeadError(f"the engine loop stopped: {type(e).__name__}: {e}")
            for stream in self._streams.values():
                stream._put(err)
            self._streams.clear()
            self._fail_inbox(err)
            return
        for rid, stream in list(self._streams.items()):
            engine.abort_request(rid)
            stream._put(_END)
        self._streams.clear()
        self._fail_inbox(_END)

    def _fail_inbox(self, item: Any) -> None:
        """Requests still queued when the loop ends: no submit can add more (the lock saw to that)."""
        for msg in self._take_inbox():
            if msg[0] == "add":
                msg[5]._put(item)

    def _take_inbox(self):
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for msg in self._take_inbox():
            if msg[0] == "add":
                _, rid, ids, params, text, stream, arrival = msg
                try:
                    self.engine.add_request(rid, ids, params, arrival_s=arrival, text=text)
                except MiniEngineError as e:
                    stream._put(e)
                    continue
                self._streams[rid] = stream
            else:
                rid = msg[1]
                if self.engine.abort_request(rid) is not None:
                    stream = self._streams.pop(rid, None)
                    if stream is not None:
                        stream._put(_END)
