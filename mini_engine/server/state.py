"""What every route shares: the async engine, admission control, the deadline and the
disconnect watch of one request, and its accounting (metrics, request log).

Admission is a plain counter on the event loop thread: past `max_concurrent_requests` a
request is refused at once (429 + Retry-After) instead of queueing without bound.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse

from ..async_engine import AsyncEngine, RequestStream
from ..errors import MiniEngineError
from ..sampling import SamplingParams
from ..sequence import Completion
from .errors import APIError, from_engine_error
from .metrics import ServerMetrics
from .request_log import RequestLog
from .server_config import ServerConfig

log = logging.getLogger("mini_engine.server")
T = TypeVar("T")


class ClientGone(Exception):
    """The client closed its connection: its requests were aborted."""


@dataclass
class Ticket:
    """One admitted engine request: what the log and the metrics need when it ends."""

    request_id: str
    endpoint: str
    mode: str  # "stream" | "batch"
    prompt_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)


class ServerState:
    def __init__(self, engine: AsyncEngine, config: ServerConfig, model_name: str,
                 request_log: RequestLog | None = None):
        self.engine = engine
        self.config = config
        self.model_name = model_name
        self.log = request_log
        self.metrics = ServerMetrics(self._engine_stats, model_name)
        self.in_flight = 0  # admitted engine requests (queued or running)
        self.core = engine.engine
        self.backend = self.core.config.backend.name
        self.device = self.core.config.backend.device
        self.max_model_len = self.core.max_positions

    def _engine_stats(self) -> dict[str, Any]:
        try:
            s = self.core.stats()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the loop is mid-step
            s = {}
        return s | {"alive": self.engine.is_alive}

    # ----- admission ---------------------------------------------------------------------
    def acquire(self, n: int) -> None:
        """Admit n engine requests or refuse at once; the caller release()s them when they end."""
        if not self.engine.is_alive:
            raise APIError(503, "the engine is not running; see the server log", code="engine_unavailable",
                           headers={"Retry-After": "5"})
        limit = self.config.max_concurrent_requests
        if self.in_flight + n > limit:
            self.metrics.error(429)
            raise APIError(429, f"the server is at its limit of {limit} concurrent requests "
                                f"(server.max_concurrent_requests); retry later",
                           code="queue_full", headers={"Retry-After": "1"})
        self.in_flight += n

    def release(self, n: int) -> None:
        self.in_flight -= n

    def submit(self, prompt: str | list[int], params: SamplingParams) -> RequestStream:
        """Tokenize, check against the window and the pool, queue. Engine refusals become 400s."""
        try:
            return self.engine.submit(prompt, params)
        except MiniEngineError as e:
            if not self.engine.is_alive:
                raise APIError(503, str(e), code="engine_unavailable", headers={"Retry-After": "5"}) from None
            raise from_engine_error(e) from None

    # ----- one request's deadline and disconnect watch ---------------------------------------
    async def bounded(self, work: Awaitable[T], request: Request | None) -> T:
        """Run `work` until done, the request's timeout (504) or the client leaving (ClientGone);
        cancelling `work` aborts its engine requests (their streams do that when left)."""
        task = asyncio.ensure_future(work)
        waiters = {task}
        gone = None
        if request is not None:
            gone = asyncio.ensure_future(_wait_disconnect(request))
            waiters.add(gone)
        timeout = self.config.request_timeout_s or None
        try:
            done, _ = await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            if gone is not None:
                gone.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if gone is not None and gone in done:
            raise ClientGone()
        raise APIError(504, f"the request did not finish within server.request_timeout_s = "
                            f"{self.config.request_timeout_s:g} s; it was aborted", code="timeout")

    # ----- accounting ----------------------------------------------------------------------
    def finished(self, ticket: Ticket, c: Completion, status: int = 200) -> None:
        self.metrics.observe(c)
        if self.log is not None:
            self.log.record(ticket.request_id, ticket.endpoint, ticket.mode, status, c.finish_reason,
                            len(c.prompt_token_ids), len(c.token_ids), c.queue_ms, c.ttft_ms, c.total_ms)

    def failed(self, ticket: Ticket, status: int, reason: str, output_tokens: int = 0,
               ttft_ms: float | None = None) -> None:
        self.metrics.error(status)
        if self.log is not None:
            e2e = (time.perf_counter() - ticket.started) * 1e3
            self.log.record(ticket.request_id, ticket.endpoint, ticket.mode, status, reason, ticket.prompt_tokens,
                            output_tokens, None, ttft_ms, e2e)


class EventStream(StreamingResponse):
    """Server-Sent Events whose clean-up runs however the response ends, including when the
    client left before the body was ever iterated (then the generator's own `finally` never
    runs): admission is released and unfinished engine requests are aborted."""

    def __init__(self, body, state: ServerState, n: int, request_ids: list[str]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._state, self._n, self._ids = state, n, request_ids

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            for rid in self._ids:
                self._state.engine.abort(rid)  # a no-op for requests that finished
            self._state.release(self._n)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client disconnects. The body was read already, so what `receive` gets
    from here on is the disconnect (vLLM's handlers race their work against the same)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Any]]:
    """Increments of several streams as they come, tagged with the stream's index. Leaving the
    iteration early cancels the readers, which aborts their unfinished requests."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def read(i: int, s: RequestStream):
        try:
            async for out in s:
                await q.put((i, out))
        except BaseException as e:  # noqa: BLE001 - the consumer re-raises it
            await q.put((i, e))
            return
        await q.put((i, done))

    tasks = [asyncio.ensure_future(read(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await q.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
