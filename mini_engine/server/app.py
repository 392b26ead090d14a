"""The FastAPI app: routes, API-key check and body limit. Route handlers only validate and
hand over (completions.py, native.py); no model logic lives here.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
from typing import Callable

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from . import completions, native
from .errors import error_response, install_error_handlers
from .protocol import CompletionRequest, GenerateRequest, ModelCard, ModelList
from .state import ServerState

log = logging.getLogger("mini_engine.server")

OPEN_PATHS = ("/health",)  # reachable without the API key (load balancers probe it)


class BodyLimit:
    """413 for a body over `max_bytes`, by its Content-Length or, for a chunked body, as soon as
    the bytes read pass the limit (so an oversized body is never held in memory)."""

    def __init__(self, app, max_bytes: int, on_reject: Callable[[int], None]):
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._reject(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI re-raises an HTTPException from reading the body; the handler answers.
                    raise HTTPException(413, self._message())
            return message

        return await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body is larger than server.max_body_bytes = {self.max_bytes} bytes"

    async def _reject(self, scope, receive, send):
        log.warning("%s %s -> 413: %s", scope.get("method"), scope.get("path"), self._message())
        self.on_reject(413)
        await error_response(413, self._message())(scope, receive, send)


class ApiKey:
    """Every route but OPEN_PATHS needs `Authorization: Bearer KEY`, compared in constant time;
    a request with two Authorization headers is refused (proxies and servers differ on which wins)."""

    def __init__(self, app, key: str, on_reject: Callable[[int], None]):
        self.app, self.key, self.on_reject = app, key.encode(), on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = [v for k, v in scope.get("headers", ()) if k == b"authorization"]
        if len(given) > 1:
            self.on_reject(400)
            log.warning("%s %s -> 400: %d Authorization headers", scope.get("method"), scope.get("path"), len(given))
            return await error_response(400, "send one Authorization header, not several",
                                        code="invalid_api_key")(scope, receive, send)
        scheme, _, token = (given[0] if given else b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        self.on_reject(401)
        log.warning("%s %s -> 401: missing or wrong API key", scope.get("method"), scope.get("path"))
        await error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")(scope, receive, send)


class LoopbackHost:
    """A server on loopback without an API key answers only requests addressed to a loopback
    name: a web page whose domain was re-pointed at 127.0.0.1 (DNS rebinding) sends its own
    Host header, and gets 400 instead of the model."""

    def __init__(self, app, on_reject: Callable[[int], None]):
        self.app, self.on_reject = app, on_reject

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        hosts = [v for k, v in scope.get("headers", ()) if k == b"host"]
        if all(is_loopback_host(h) for h in hosts):  # no Host header (HTTP/1.0): not a browser
            return await self.app(scope, receive, send)
        self.on_reject(400)
        log.warning("%s %s -> 400: Host header %r is not a loopback name", scope.get("method"), scope.get("path"),
                    hosts[0] if len(hosts) == 1 else hosts)
        await error_response(400, "this server answers requests to localhost, 127.0.0.1 or [::1] only "
                                  "(set server.api_key to serve other names)", code="invalid_host")(scope, receive, send)


def is_loopback_host(value: bytes) -> bool:
    """Whether a Host header names this machine's loopback: localhost, 127.x.x.x or [::1], any port."""
    try:
        host = value.decode("ascii").strip().lower()
    except UnicodeDecodeError:
        return False
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else ""
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="mini-engine", version=__version__, docs_url="/docs", redoc_url=None)
    app.state.server = state
    install_error_handlers(app)

    # add_middleware wraps what was added before: the last one added sees a request first. So the
    # Host check comes first, then CORS (its preflights and headers also cover 401s), then the key.
    sc = state.config
    app.add_middleware(BodyLimit, max_bytes=sc.max_body_bytes, on_reject=state.metrics.error)
    if sc.api_key:
        app.add_middleware(ApiKey, key=sc.api_key, on_reject=state.metrics.error)
    if sc.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=sc.cors_origins or ["*"],
                           allow_methods=["*"], allow_headers=["*"])
    if sc.loopback and not sc.api_key:
        app.add_middleware(LoopbackHost, on_reject=state.metrics.error)

    @app.get("/health")
    async def health():
        # A runner can fail while the loop idles (a tensor-parallel rank killed): ask it as well.
        problem = state.core.runner.health_problem()
        if state.engine.is_alive and problem is None:
            return {"status": "ok", "model": state.model_name}
        log.error("/health -> 503: %s", problem or f"engine loop stopped: {state.engine.error!r}")
        return error_response(503, "the engine is not running; see the server log", code="engine_unavailable")

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=state.model_name, max_model_len=state.max_model_len,
                                         backend=state.backend, device=state.device)])

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        return await completions.create_completion(body, request, state)

    @app.post("/v1/chat/completions")
    async def chat_completions():
        return error_response(400, "GPT-2 has no chat template, so this server does not serve chat completions; "
                                   "send the text as 'prompt' to POST /v1/completions", "messages",
                              "chat_not_supported")

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request):
        return await native.generate(body, request, state)

    @app.post("/generate/stream")
    async def generate_stream(body: GenerateRequest, request: Request):
        return await native.generate_stream(body, request, state)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/stats")
    async def stats():
        """The engine's counters as JSON (tests and `mini-engine load` read KV usage here)."""
        return JSONResponse(state.engine.stats() | {"admitted": state.in_flight, "alive": state.engine.is_alive})

    return app
