"""POST /v1/completions (OpenAI's Completions API) over the async engine.

A request becomes one engine request per prompt, each with the same sampling params (a
seed is offset per prompt, as `Engine.generate` does); choices come back in prompt order.
This module only translates: every token comes from the one engine path.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse

from ..errors import MiniEngineError
from ..sampling import SamplingParams
from ..sequence import Completion
from .errors import APIError, error_body, field_param
from .protocol import (CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest,
                       CompletionResponse, Usage, completion_id)
from .state import ClientGone, EventStream, ServerState, Ticket, end_reason, engine_error, merge_streams

ENDPOINT = "/v1/completions"
log = logging.getLogger("mini_engine.server")


def sampling_params(req: CompletionRequest, state: ServerState) -> SamplingParams:
    # Every field from the request (OpenAI's defaults where it is silent), none from the config's
    # [generation] defaults: a client gets the same answer from any server it talks to.
    try:
        return SamplingParams(
            max_new_tokens=req.max_tokens if req.max_tokens is not None else 16,
            temperature=req.temperature if req.temperature is not None else 1.0,
            top_p=req.top_p if req.top_p is not None else 1.0,
            top_k=max(req.top_k or 0, 0),  # vLLM's -1 and 0 both mean off
            seed=req.seed, stop=list(req.stop or []), ignore_eos=req.ignore_eos, truncate=req.truncate,
            logprobs=req.logprobs, min_tokens=req.min_tokens)
    except MiniEngineError as e:  # a ConfigError's message starts with the field's name
        raise APIError(400, str(e), field_param(str(e), CompletionRequest)) from None


def check_model(req_model: str | None, state: ServerState) -> str:
    if req_model is not None and req_model != state.model_name:
        raise APIError(404, f"model '{req_model}' is not served here; this server serves '{state.model_name}' "
                            f"(GET /v1/models)", "model", "model_not_found")
    return state.model_name


async def create_completion(req: CompletionRequest, raw: Request, state: ServerState):
    model = check_model(req.model, state)
    params = sampling_params(req, state)
    prompts = req.prompts()
    mode = "stream" if req.stream else "batch"
    n = len(prompts)
    state.check_prompt_count(n)
    ids = [state.encode(p, params) for p in prompts]
    state.check_size(ids, params)
    state.acquire(n)
    streams, tickets = [], []
    try:
        for i, (p, pid) in enumerate(zip(prompts, ids)):
            s = state.submit(pid, params.for_prompt(i), text=p if isinstance(p, str) else None)
            streams.append(s)
            tickets.append(Ticket(s.request_id, ENDPOINT, mode, s.prompt_tokens))
    except BaseException:
        for s in streams:
            state.engine.abort(s.request_id)
        state.release(n)
        raise
    texts = [p if isinstance(p, str) else state.core.tokenizer.decode(p) for p in prompts] if req.echo else None
    if req.stream:
        # The response body owns the admission from here on and releases it when it ends.
        return EventStream(_stream(req, model, streams, tickets, texts, state), state, streams)
    try:
        results = await state.bounded(asyncio.gather(*(s.result() for s in streams)), raw)
    except ClientGone:
        for t in tickets:
            state.failed(t, 499, "abort")
        return JSONResponse(error_body(499, "client closed the request"), status_code=499)
    except MiniEngineError as e:  # one prompt's request ended early: the whole answer fails
        for s in streams:
            state.engine.abort(s.request_id)
        err = engine_error(e)
        for s, t in zip(streams, tickets):
            state.failed(t, err.status, end_reason(err.status),
                         e.output_tokens if getattr(e, "request_id", None) == s.request_id else 0)
        err.counted = True
        raise err from None
    finally:
        state.release(n)
    choices, usage = [], Usage()
    for i, (c, t) in enumerate(zip(results, tickets)):
        state.finished(t, c)
        text = c.text
        lp = None
        if req.logprobs is not None:
            lp = _logprobs(state, c.logprobs or [], 0, req.logprobs)
        if req.echo:
            text = c.prompt + text
        choices.append(CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=c.finish_reason))
        usage.prompt_tokens += len(c.prompt_token_ids)
        usage.completion_tokens += len(c.token_ids)
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return CompletionResponse(model=model, choices=choices, usage=usage)


async def _stream(req: CompletionRequest, model: str, streams, tickets, texts, state: ServerState) -> AsyncIterator[str]:
    cid, created = completion_id(), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    n = len(streams)
    prompt_tokens = [0] * n
    out_tokens = [0] * n
    offsets = [0] * n
    first = [True] * n
    ended = [False] * n
    first_token_ms: list[float | None] = [None] * n
    try:
        try:
            async for i, out in merge_streams(streams):
                text = out.text
                if first[i]:
                    first[i] = False
                    first_token_ms[i] = (time.perf_counter() - tickets[i].started) * 1e3
                    if req.echo:
                        text = texts[i] + text
                out_tokens[i] += len(out.new_token_ids)
                lp = None
                if req.logprobs is not None:
                    lp = _logprobs(state, getattr(out, "logprobs", None) or [], offsets[i], req.logprobs)
                offsets[i] += len(text)
                usage = None
                if out.finished:
                    c: Completion = out.completion
                    prompt_tokens[i] = len(c.prompt_token_ids)
                    ended[i] = True
                    state.finished(tickets[i], c)
                if continuous:
                    usage = Usage(prompt_tokens=prompt_tokens[i], completion_tokens=out_tokens[i],
                                  total_tokens=prompt_tokens[i] + out_tokens[i])
                chunk = CompletionChunk(id=cid, created=created, model=model, usage=usage, choices=[
                    CompletionChoice(index=i, text=text, logprobs=lp,
                                     finish_reason=out.finish_reason if out.finished else None)])
                yield f"data: {chunk.model_dump_json()}\n\n"
        except Exception as e:  # noqa: BLE001 - the headers are sent: the error goes in the stream
            err = engine_error(e)
            if not isinstance(e, MiniEngineError):
                log.error("%s stream: %s: %s", ENDPOINT, type(e).__name__, e)
            for i, t in enumerate(tickets):
                if not ended[i]:
                    ended[i] = True
                    state.failed(t, err.status, end_reason(err.status), out_tokens[i], first_token_ms[i])
            yield f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"
            yield "data: [DONE]\n\n"
            return
        if include_usage:
            pt, ct = sum(prompt_tokens), sum(out_tokens)
            chunk = CompletionChunk(id=cid, created=created, model=model, choices=[],
                                    usage=Usage(prompt_tokens=pt, completion_tokens=ct, total_tokens=pt + ct))
            yield f"data: {chunk.model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        # Reached on completion and when the client went away (the response task is cancelled
        # and this generator closed); EventStream releases the admission and aborts what is left.
        for i, t in enumerate(tickets):
            if not ended[i]:
                state.failed(t, 499, "abort", out_tokens[i], first_token_ms[i])


def _logprobs(state: ServerState, positions, offset: int, k: int) -> CompletionLogprobs:
    """OpenAI's logprobs object for generated positions (`positions`: the engine's TokenLogprob)."""
    tok = state.core.tokenizer
    out = CompletionLogprobs()
    at = offset
    for p in positions:
        s = tok.decode([p.token_id])
        out.tokens.append(s)
        out.token_logprobs.append(p.logprob)
        top: dict[str, float] = {}
        for tid, lp in p.top[:k]:
            top.setdefault(tok.decode([tid]), lp)
        if k:
            top.setdefault(s, p.logprob)  # as OpenAI: the sampled token is always there (k + 1 at most)
        out.top_logprobs.append(top if k else None)
        out.text_offset.append(at)
        at += len(s)
    return out
