"""One request to an OpenAI-compatible Completions endpoint, timed on the client, as a RequestRecord.

Streaming (`stream: true`, `stream_options.include_usage`): Server-Sent Events lines
`data: {chunk}` until `data: [DONE]`; every chunk whose choice carries text is a token
arrival (TTFT = the first, ITL = the gaps between them); the final usage chunk
(`choices: []`) gives the output token count. Non-streaming: one JSON answer, so its
TTFT is its E2EL and there are no per-token times.

Also here: the loopback-only URL check and GET /v1/models.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..errors import ConfigError, MiniEngineError

LOOPBACK_NAMES = ("localhost",)


class ServerUnreachable(MiniEngineError):
    """No connection to the server at all: every request would fail the same way."""


@dataclass
class RequestRecord:
    """One request as the client saw it. Times in ms from the request's own start, except start_s
    (seconds from the run's start). A request never sent (the run's deadline came first) has
    start_s None and error_kind "deadline"."""

    index: int
    start_s: float | None = None
    status: int | None = None  # HTTP status; None when no response arrived
    prompt_tokens: int | None = None  # usage.prompt_tokens, else the client's own count when it knows it
    output_tokens: int = 0  # usage.completion_tokens, else (streaming) the token chunks counted
    ttft_ms: float | None = None  # streaming: first token chunk; non-streaming: = e2el_ms
    itl_ms: list[float] = field(default_factory=list)  # gaps between token chunks (streaming)
    e2el_ms: float | None = None  # request sent -> last byte ([DONE] or the whole JSON body)
    finish_reason: str | None = None
    usage_reported: bool = False  # the answer carried usage (else output_tokens is a chunk count)
    stream: bool = True
    error_kind: str = ""  # "" = success; http_<status>, timeout, deadline, connect, protocol, ...
    error: str = ""
    text_chars: int = 0  # length of the generated text

    @property
    def ok(self) -> bool:
        return not self.error_kind

    @property
    def tpot_ms(self) -> float | None:
        """Time per output token after the first: (e2el - ttft) / (output_tokens - 1), as vLLM's
        bench defines it; None without per-token times (non-streaming) or with one token or less."""
        if not self.ok or not self.stream or self.output_tokens < 2 or self.ttft_ms is None:
            return None
        return (self.e2el_ms - self.ttft_ms) / (self.output_tokens - 1)

    def token_times_ms(self) -> list[float]:
        """Arrival of each token chunk, ms from the request's start (the whole answer's arrival
        once per output token when non-streaming)."""
        if not self.ok or self.ttft_ms is None:
            return []
        if not self.stream:
            return [self.e2el_ms] * self.output_tokens
        times = [self.ttft_ms]
        for gap in self.itl_ms:
            times.append(times[-1] + gap)
        return times

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tpot_ms"] = self.tpot_ms
        return d


def check_url(url: str, allow_remote: bool = False) -> str:
    """The server root without a trailing slash; refuses a host that is not loopback (127.0.0.0/8,
    ::1, localhost) unless `allow_remote`: a benchmark sent elsewhere by mistake is someone's traffic."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url {url!r}: expected http://HOST:PORT (the server root, e.g. http://127.0.0.1:8000)")
    if parts.query or parts.fragment:
        raise ConfigError(f"--url {url!r}: the server root takes no query or fragment")
    try:
        parts.port
    except ValueError as e:
        raise ConfigError(f"--url {url!r}: {e}") from None
    if not allow_remote and not is_loopback(parts.hostname):
        raise ConfigError(f"--url {url!r}: host {parts.hostname!r} is not loopback (127.0.0.1, ::1, localhost); "
                          f"pass --allow-remote to send load to another machine")
    return url.rstrip("/")


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def fetch_models(client: httpx.AsyncClient, base_url: str) -> dict[str, Any]:
    """GET {base_url}/v1/models: the answer as JSON. A server that cannot be reached is an error
    (every request would fail the same way); an HTTP error or a non-JSON answer is too."""
    url = f"{base_url}/v1/models"
    try:
        resp = await client.get(url)
    except httpx.HTTPError as e:
        raise ServerUnreachable(f"cannot reach {url}: {_describe(e)}") from None
    if resp.status_code != 200:
        raise MiniEngineError(f"GET {url}: {_http_error(resp.status_code, resp.text)}")
    try:
        answer = resp.json()
    except ValueError:
        raise MiniEngineError(f"GET {url}: not JSON: {_snippet(resp.text)}") from None
    if not isinstance(answer, dict):
        raise MiniEngineError(f"GET {url}: expected an object with 'data', got {_snippet(resp.text)}")
    return answer


def first_model(answer: dict[str, Any], url: str) -> str:
    data = answer.get("data")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) or not data[0].get("id"):
        raise MiniEngineError(f"{url}/v1/models lists no model; pass --model NAME")
    return str(data[0]["id"])


def request_body(model: str, prompt: str | list[int], max_tokens: int, stream: bool, ignore_eos: bool,
                 temperature: float) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                            "temperature": temperature, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM's extension of the Completions API
    return body


async def send(client: httpx.AsyncClient, url: str, body: dict[str, Any], record: RequestRecord,
               run_start: float, timeout_s: float, prompt_tokens: int | None = None) -> RequestRecord:
    """POST `body` to `url` and fill `record` in place (also when the request fails or is
    cancelled midway: what arrived before stays). Never raises except on cancellation."""
    start = time.perf_counter()
    record.start_s = start - run_start
    record.stream = bool(body.get("stream"))
    record.prompt_tokens = prompt_tokens
    try:
        await asyncio.wait_for(_exchange(client, url, body, record, start), timeout_s)
    except asyncio.TimeoutError:
        _fail(record, "timeout", f"no complete answer within --timeout-s {timeout_s:g}")
    except httpx.TimeoutException as e:
        _fail(record, "timeout", _describe(e))
    except httpx.ConnectError as e:
        _fail(record, "connect", _describe(e))
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
        _fail(record, "protocol", _describe(e))
    except httpx.HTTPError as e:
        _fail(record, "http", _describe(e))
    except _BadAnswer as e:
        _fail(record, e.kind, str(e))
    if record.e2el_ms is None:
        record.e2el_ms = (time.perf_counter() - start) * 1e3
    return record


class _BadAnswer(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _fail(record: RequestRecord, kind: str, message: str) -> None:
    if not record.error_kind:  # the first reason is the one that counts
        record.error_kind, record.error = kind, message


async def _exchange(client, url, body, record: RequestRecord, start: float) -> None:
    if not record.stream:
        resp = await client.post(url, json=body)
        record.status = resp.status_code
        if resp.status_code != 200:
            raise _BadAnswer(f"http_{resp.status_code}", _http_error(resp.status_code, resp.text))
        try:
            answer = resp.json()
        except ValueError:
            raise _BadAnswer("bad_response", f"not JSON: {_snippet(resp.text)}") from None
        record.e2el_ms = record.ttft_ms = (time.perf_counter() - start) * 1e3
        _read_answer(answer, record)
        return
    async with client.stream("POST", url, json=body) as resp:
        record.status = resp.status_code
        if resp.status_code != 200:
            text = (await resp.aread()).decode("utf-8", "replace")
            raise _BadAnswer(f"http_{resp.status_code}", _http_error(resp.status_code, text))
        chunks, last, done = 0, None, False
        async for line in resp.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data:"):
                continue  # blank separators, ": comments", "event:" / "id:" fields
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                raise _BadAnswer("bad_response", f"not a JSON event: {_snippet(data)}") from None
            if not isinstance(chunk, dict):
                raise _BadAnswer("bad_response", f"not a completion chunk: {_snippet(data)}")
            if "error" in chunk:
                raise _BadAnswer("stream_error", f"error event: {_error_message(chunk) or _snippet(data)}")
            text = _choice_text(chunk, record)
            if text:
                chunks += 1
                record.text_chars += len(text)
                if last is None:
                    record.ttft_ms = (now - start) * 1e3
                else:
                    record.itl_ms.append((now - last) * 1e3)
                last = now
            _read_usage(chunk, record)
        record.e2el_ms = (time.perf_counter() - start) * 1e3
        if not record.usage_reported:
            record.output_tokens = chunks
        if not done:
            raise _BadAnswer("protocol", "the event stream ended before data: [DONE]")


def _choice_text(chunk: dict[str, Any], record: RequestRecord) -> str:
    choices = chunk.get("choices") or []
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if choice.get("finish_reason"):
        record.finish_reason = str(choice["finish_reason"])
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def _read_usage(answer: dict[str, Any], record: RequestRecord) -> None:
    usage = answer.get("usage")
    if not isinstance(usage, dict):
        return
    if isinstance(usage.get("completion_tokens"), int):
        record.output_tokens = usage["completion_tokens"]
        record.usage_reported = True
    if isinstance(usage.get("prompt_tokens"), int):
        record.prompt_tokens = usage["prompt_tokens"]


def _read_answer(answer: Any, record: RequestRecord) -> None:
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list) or not answer["choices"]:
        raise _BadAnswer("bad_response", f"not a completion: {_snippet(json.dumps(answer))}")
    record.text_chars = len(_choice_text(answer, record))
    _read_usage(answer, record)


def _error_message(answer: Any) -> str | None:
    """OpenAI's {"error": {"message": ...}} (or {"error": "..."}, {"detail": ...}): the message."""
    if not isinstance(answer, dict):
        return None
    err = answer.get("error", answer.get("detail"))
    if isinstance(err, dict) and err.get("message"):
        return _snippet(str(err["message"]))
    return _snippet(err) if isinstance(err, str) and err else None


def _http_error(status: int, text: str) -> str:
    try:
        message = _error_message(json.loads(text))
    except ValueError:
        message = None
    return f"HTTP {status}: {message or _snippet(text) or '(empty body)'}"


def _describe(e: Exception) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."
