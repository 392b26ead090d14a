"""The studies' native endpoints: POST /generate (the whole completion and its timings in one
JSON) and POST /generate/stream (Server-Sent Events, one per token increment, then a final
event with the timings). Same engine path as /v1/completions, one prompt per request.
"""
from __future__ import annotations

import json
import logging
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from ..errors import MiniEngineError
from ..sampling import SamplingParams
from ..sequence import Completion
from .errors import APIError, error_body, field_param
from .protocol import GenerateRequest, GenerateResponse, Usage
from .state import ClientGone, EventStream, ServerState, Ticket, end_reason, engine_error

log = logging.getLogger("mini_engine.server")


def _params(req: GenerateRequest, state: ServerState):
    try:
        return SamplingParams(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                              top_p=req.top_p, seed=req.seed, stop=list(req.stop), ignore_eos=req.ignore_eos,
                              truncate=req.truncate)
    except MiniEngineError as e:  # a ConfigError's message starts with the field's name
        raise APIError(400, str(e), field_param(str(e), GenerateRequest)) from None


def _response(rid: str, c: Completion) -> GenerateResponse:
    n_prompt, n_out = len(c.prompt_token_ids), len(c.token_ids)
    return GenerateResponse(
        request_id=rid, prompt=c.prompt, text=c.text, token_ids=c.token_ids, finish_reason=c.finish_reason,
        usage=Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out),
        queue_ms=round(c.queue_ms, 3), ttft_ms=round(c.ttft_ms, 3), e2e_ms=round(c.total_ms, 3),
        tpot_ms=round(c.tpot_ms, 3), tokens_per_s=round(c.tokens_per_s, 2),
        cached_prompt_tokens=c.cached_prompt_tokens, preemptions=c.preemptions)


def _start(req: GenerateRequest, state: ServerState, endpoint: str, mode: str):
    params = _params(req, state)
    ids = state.encode(req.prompt, params)
    state.check_size([ids], params)
    state.acquire(1)
    try:
        stream = state.submit(ids, params, text=req.prompt if isinstance(req.prompt, str) else None)
    except BaseException:
        state.release(1)
        raise
    return stream, Ticket(stream.request_id, endpoint, mode, stream.prompt_tokens)


async def generate(req: GenerateRequest, raw: Request, state: ServerState):
    stream, ticket = _start(req, state, "/generate", "batch")
    try:
        c = await state.bounded(stream.result(), raw)
    except MiniEngineError as e:
        err = engine_error(e)
        state.failed(ticket, err.status, end_reason(err.status), getattr(e, "output_tokens", 0))
        err.counted = True
        raise err from None
    except ClientGone:
        state.failed(ticket, 499, "abort")
        return JSONResponse(error_body(499, "client closed the request"), status_code=499)
    finally:
        state.release(1)
    state.finished(ticket, c)
    return _response(stream.request_id, c)


async def generate_stream(req: GenerateRequest, raw: Request, state: ServerState):
    stream, ticket = _start(req, state, "/generate/stream", "stream")
    return EventStream(_events(stream, ticket, state), state, [stream])


async def _events(stream, ticket: Ticket, state: ServerState) -> AsyncIterator[str]:
    ended, n_out = False, 0
    try:
        try:
            async for out in stream:
                n_out += len(out.new_token_ids)
                event = {"request_id": stream.request_id, "text": out.text, "token_ids": out.new_token_ids,
                         "finished": out.finished}
                if out.finished:
                    ended = True
                    state.finished(ticket, out.completion)
                    event |= _response(stream.request_id, out.completion).model_dump(exclude={"text", "token_ids"})
                yield f"data: {json.dumps(event)}\n\n"
        except Exception as e:  # noqa: BLE001 - the headers are sent: the error goes in the stream
            ended = True
            err = engine_error(e)
            if not isinstance(e, MiniEngineError):
                log.error("/generate/stream: %s: %s", type(e).__name__, e)
            state.failed(ticket, err.status, end_reason(err.status), n_out)
            yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"
    finally:
        if not ended:
            state.failed(ticket, 499, "abort", n_out)
