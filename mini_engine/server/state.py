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

from ..async_engine import AsyncEngine, EngineDeadError, RequestStream, RequestTimedOut, StreamBacklogFull
from ..errors import ConfigError, MiniEngineError
from ..sampling import SamplingParams
from ..sequence import Completion
from .errors import APIError, from_engine_error
from .metrics import ServerMetrics
from .request_log import RequestLog
from .server_config import ServerConfig

log = logging.getLogger("mini_engine.server")
T = TypeVar("T")


STREAM_CLOSE_GRACE_S = 5.0


def engine_error(e: BaseException) -> APIError:
    """What a client is told of a request that the engine ended: no internal detail (the log has it)."""
    if isinstance(e, RequestTimedOut):
        return APIError(504, "the request did not finish within the server's request timeout "
                             "(server.request_timeout_s); it was aborted", code="timeout")
    if isinstance(e, StreamBacklogFull):
        return APIError(499, "the client stopped reading the stream; the request was aborted", code="client_too_slow")
    if isinstance(e, EngineDeadError):
        return APIError(503, "the engine is not running; see the server log", code="engine_unavailable",
                        headers={"Retry-After": "5"})
    return APIError(500, "the engine failed while computing this request; see the server log", code="internal_error")


def end_reason(status: int) -> str:
    """The request log's finish_reason for a request that ended with `status`."""
    return {504: "timeout", 499: "abort"}.get(status, "error")


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
    def check_prompt_count(self, n: int) -> None:
        """Prompts in one request (server.max_prompts_per_request, and never more than can be
        admitted at once): a 400 naming the limit, since retrying could never succeed."""
        sc = self.config
        if n > min(sc.max_prompts_per_request, sc.max_concurrent_requests):
            name = "max_prompts_per_request" if sc.max_prompts_per_request <= sc.max_concurrent_requests \
                else "max_concurrent_requests"
            raise APIError(400, f"this request has {n} prompts; the server takes at most {getattr(sc, name)} "
                                f"per request (server.{name})", "prompt", "request_too_large")

    def check_size(self, prompts: list[list[int]], params: SamplingParams) -> None:
        """Tokens and logprobs one request may ask for (server.max_*_per_request): 400 past them."""
        sc = self.config
        n = len(prompts)
        tokens = sum(len(p) for p in prompts) + n * params.max_new_tokens
        if tokens > sc.max_tokens_per_request:
            raise APIError(400, f"this request needs {tokens} tokens (prompt tokens + max_tokens, over its prompts); "
                                f"the server takes at most {sc.max_tokens_per_request} per request "
                                f"(server.max_tokens_per_request)", "max_tokens", "request_too_large")
        if params.logprobs and params.logprobs * n > sc.max_logprobs_per_request:
            raise APIError(400, f"logprobs {params.logprobs} x {n} prompts = {params.logprobs * n}; the server "
                                f"takes at most {sc.max_logprobs_per_request} per request "
                                f"(server.max_logprobs_per_request)", "logprobs", "request_too_large")

    def acquire(self, n: int) -> None:
        """Admit n engine requests or refuse at once; the caller release()s them when they end."""
        if not self.engine.is_alive:
            raise APIError(503, "the engine is not running; see the server log", code="engine_unavailable",
                           headers={"Retry-After": "5"})
        limit = self.config.max_concurrent_requests
        if self.in_flight + n > limit:
            raise APIError(429, f"the server is at its limit of {limit} concurrent requests "
                                f"(server.max_concurrent_requests); retry later",
                           code="queue_full", headers={"Retry-After": "1"})
        self.in_flight += n

    def release(self, n: int) -> None:
        self.in_flight -= n

    def encode(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """A prompt's token ids, checked against the vocabulary and the window (400 if not)."""
        try:
            if isinstance(prompt, str):
                return self.core.encode_prompt(prompt, params)
            return self.core.check_prompt_ids(prompt, params)
        except ConfigError as e:
            raise APIError(400, str(e), "prompt") from None
        except MiniEngineError as e:
            raise from_engine_error(e) from None

    def submit(self, ids: list[int], params: SamplingParams, text: str | None = None) -> RequestStream:
        """Check against the pool, queue with the request's deadline. Engine refusals become 400s."""
        try:
            return self.engine.submit(ids, params, text=text, timeout_s=self.config.request_timeout_s or None)
        except MiniEngineError as e:
            raise (engine_error(e) if not self.engine.is_alive else from_engine_error(e)) from None

    # ----- one request's deadline and disconnect watch ---------------------------------------
    async def bounded(self, work: Awaitable[T], request: Request) -> T:
        """Run `work` until done or the client leaving (ClientGone); cancelling `work` aborts its
        engine requests (their streams do that when left). The deadline is the engine's: its
        streams end with RequestTimedOut."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            gone.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientGone()

    # ----- accounting ----------------------------------------------------------------------
    def finished(self, ticket: Ticket, c: Completion, status: int = 200) -> None:
        self.metrics.observe(c)
        if self.log is not None:
            self.log.record(ticket.request_id, ticket.endpoint, ticket.mode, status, c.finish_reason,
                            len(c.prompt_token_ids), len(c.token_ids), c.queue_ms, c.ttft_ms, c.total_ms)

    def failed(self, ticket: Ticket, status: int, reason: str, output_tokens: int = 0,
               ttft_ms: float | None = None) -> None:
        """An admitted request that ended without its completion: its metric and its log row."""
        self.metrics.error(status)
        if self.log is not None:
            e2e = (time.perf_counter() - ticket.started) * 1e3
            self.log.record(ticket.request_id, ticket.endpoint, ticket.mode, status, reason, ticket.prompt_tokens,
                            output_tokens, None, ttft_ms, e2e)


class EventStream(StreamingResponse):
    """Server-Sent Events whose clean-up runs however the response ends, including when the
    client left before the body was ever iterated (then the generator's own `finally` never
    runs): admission is released and unfinished engine requests are aborted.

    Admission counts engine requests, so it is released as soon as the engine has ended all of
    the response's requests (finished, failed, timed out, or aborted for a reader that stopped
    reading), not when a stalled client lets the response end: a response still not done
    STREAM_CLOSE_GRACE_S after that is cut and its connection closed."""

    def __init__(self, body, state: ServerState, streams: list[RequestStream]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._state, self._streams = state, streams
        self._released = False

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._state.release(len(self._streams))

    async def _watch(self, response: asyncio.Future) -> None:
        await asyncio.gather(*(s.ended.wait() for s in self._streams))
        self._release()
        await asyncio.sleep(STREAM_CLOSE_GRACE_S)
        if not response.done():
            log.warning("stream of %s: the client did not read its last events; connection closed",
                        ", ".join(s.request_id for s in self._streams))
            self._cut = True
            response.cancel()

    async def __call__(self, scope, receive, send):
        self._cut = False
        response = asyncio.ensure_future(super().__call__(scope, receive, send))
        watcher = asyncio.ensure_future(self._watch(response))
        try:
            await response
        except asyncio.CancelledError:
            if not self._cut:
                raise  # the server's own cancellation (shutdown): let it through
        finally:
            watcher.cancel()
            for s in self._streams:
                self._state.engine.abort(s.request_id)  # a no-op for requests that ended
            self._release()


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
    # Bounded: when the consumer stalls (its client stopped reading), the readers stall too and the
    # increments wait in their streams, where max_stream_backlog sees them.
    q: asyncio.Queue = asyncio.Queue(maxsize=len(streams))
    done = object()

    async def read(i: int, s: RequestStream):
        try:
            async for out in s:
                await q.put((i, out))
        except Exception as e:  # noqa: BLE001 - the consumer re-raises it (cancellation is not caught)
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
