"""`mini-engine serve`: engine -> async engine -> FastAPI app -> uvicorn, and back down in order.

SIGINT/SIGTERM: uvicorn stops accepting and lets in-flight requests finish for up to
server.shutdown_grace_s; then the engine loop stops and the request log is flushed, and the
process exits 0 (uvicorn would re-raise the signal; a graceful stop is a normal exit here).
`Server` also runs in a thread of the caller's process (tests, benchmarks): same app, same
uvicorn, a real socket on loopback.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import threading
from typing import Callable

from ..config import Config
from ..errors import ConfigError, MiniEngineError

log = logging.getLogger("mini_engine.server")


class OneLineFormatter(logging.Formatter):
    """One line per record whatever a request put in it: control characters (a path's %0a, a
    prompt's escape sequences) and tracebacks are escaped, so no client can forge log lines."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


def escape_controls(text: str) -> str:
    return text.translate(_CONTROLS) if any(c in _CONTROLS for c in map(ord, text)) else text


_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0))} | {0x2028: "\\u2028", 0x2029: "\\u2029"}


def configure_logging() -> None:
    """The package's loggers (server, engine) and uvicorn's write one escaped line each to stderr."""
    root = logging.getLogger("mini_engine")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name, level in (("mini_engine", logging.INFO), ("uvicorn", logging.WARNING)):
            logger = logging.getLogger(name)
            logger.addHandler(h)
            logger.setLevel(level)
            logger.propagate = False


class Server:
    """An engine behind the HTTP app: `start()` returns once the socket listens, `stop()`
    drains in-flight requests (up to the grace period), stops the engine and flushes the log."""

    def __init__(self, cfg: Config, engine=None):
        import uvicorn
        from prometheus_client import disable_created_metrics

        from ..async_engine import AsyncEngine
        from ..engine import Engine
        from .app import build_app
        from .request_log import RequestLog
        from .state import ServerState

        disable_created_metrics()  # as vLLM: no *_created series beside every counter
        configure_logging()
        self.cfg, sc = cfg, cfg.server
        self._socket: socket.socket | None = None
        self._bind()  # first: a taken port fails before minutes of model loading
        self._own_engine = engine is None
        self.engine = None
        self.request_log = None
        try:
            self.engine = Engine(config=cfg) if engine is None else engine
            if not self.engine.continuous:
                raise ConfigError(f"the server needs continuous batching, which this configuration lacks: "
                                  f"{self.engine.static_reason}")
            self.async_engine = AsyncEngine(self.engine, max_stream_backlog=sc.max_stream_backlog)
            self.warmup_s = self._warmup()
            if sc.log_csv:
                self.request_log = RequestLog(sc.log_csv, cfg.backend.name, cfg.backend.device)
        except BaseException:
            self._socket.close()
            if self.engine is not None:
                self._close_engine()
            raise
        self.model_name = sc.model_name or cfg.model.source
        self.state = ServerState(self.async_engine, sc, self.model_name, self.request_log)
        self.app = build_app(self.state)
        # log_config=None: uvicorn's loggers write through configure_logging's escaping handler.
        ucfg = uvicorn.Config(self.app, host=sc.host, port=sc.port, log_config=None, access_log=sc.access_log,
                              timeout_graceful_shutdown=sc.shutdown_grace_s, lifespan="off",
                              limit_concurrency=sc.max_connections, timeout_keep_alive=min(5, sc.header_timeout_s),
                              http=header_timeout_protocol(sc.header_timeout_s))
        if sc.access_log:
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        self._uvicorn = _uvicorn_server_class()(ucfg)
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None
        self._closed = False

    def _warmup(self) -> float:
        """One short generation before the socket accepts: kernels compile (numba) and ONNX
        Runtime plans its first shapes now, not in the first user's TTFT."""
        import time

        from ..sampling import SamplingParams

        t = time.perf_counter()
        self.async_engine.generate([self.engine.tokenizer.eos_token_id] * 20, SamplingParams(max_new_tokens=2))
        return time.perf_counter() - t

    @property
    def url(self) -> str:
        sc = self.cfg.server
        port = self._socket.getsockname()[1] if self._socket is not None else sc.port
        host = f"[{sc.host}]" if ":" in sc.host else sc.host
        return f"http://{host}:{port}"

    def _bind(self) -> socket.socket:
        """Bind before uvicorn does, so a taken port is one error line that says why."""
        sc = self.cfg.server
        try:
            infos = socket.getaddrinfo(sc.host, sc.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, kind, proto, _, addr = infos[0]
            # With the protocol getaddrinfo gives (IPPROTO_TCP): asyncio sets TCP_NODELAY only on
            # sockets that say so, and with Nagle on, a response written in parts (headers then
            # body, one SSE event after another) waits ~40 ms for the client's delayed ACK.
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        except OSError as e:
            raise ConfigError(f"the server cannot listen on {sc.host}:{sc.port}: {e.strerror or e}") from None
        sock.set_inheritable(True)
        self._socket = sock
        return sock

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Serve in this (the main) thread until SIGINT/SIGTERM, then shut down."""
        try:
            asyncio.run(self._serve(on_ready))
        finally:
            self.close()

    def start(self, timeout: float = 60.0) -> "Server":
        """Serve from a background thread (no signal handling there); returns once listening."""
        ready = threading.Event()

        def target():
            try:
                asyncio.run(self._serve(ready.set))
            except BaseException as e:  # noqa: BLE001 - start() reports it
                self._failed = e
            finally:
                ready.set()

        self._thread = threading.Thread(target=target, name="http-server", daemon=True)
        self._thread.start()
        ready.wait(timeout)
        if self._failed is not None or not self._uvicorn.started:
            self.stop()
            raise MiniEngineError(f"the server did not start: {self._failed or 'timed out'}")
        return self

    def stop(self, timeout: float = 60.0) -> None:
        if self._thread is not None:
            self._uvicorn.should_exit = True
            self._thread.join(timeout)
            self._thread = None
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.async_engine.close()
        self._close_engine()
        if self.request_log is not None:
            self.request_log.close()
        if self._socket is not None:
            self._socket.close()

    def _close_engine(self) -> None:
        if self._own_engine:
            self.engine.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    async def _serve(self, on_ready: Callable[[], None] | None) -> None:
        task = asyncio.ensure_future(self._uvicorn.serve(sockets=[self._socket]))
        while not self._uvicorn.started and not task.done():
            await asyncio.sleep(0.02)
        if self._uvicorn.started and on_ready is not None:
            on_ready()
        await task


def header_timeout_protocol(timeout_s: float):
    """uvicorn's HTTP protocol class, closing a connection that serves no request for `timeout_s`:
    one that is slow to send its request's headers (slowloris) or idles between requests. Once
    the headers are in, the request's own deadline (server.request_timeout_s) applies."""
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    base = import_from_string(HTTP_PROTOCOLS["auto"])
    check_every = min(1.0, timeout_s / 4)

    class HeaderTimeoutProtocol(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._idle_since = self.loop.time()
            self._idle_timer = self.loop.call_later(check_every, self._check_idle)

        def _check_idle(self) -> None:
            if self.transport.is_closing():
                return
            now = self.loop.time()
            if self.cycle is not None and not self.cycle.response_complete:
                self._idle_since = now  # a request is being served
            elif now - self._idle_since > timeout_s:
                self.transport.close()
                return
            self._idle_timer = self.loop.call_later(check_every, self._check_idle)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._idle_since = self.loop.time()  # a keep-alive connection's idle time starts now

        def connection_lost(self, exc) -> None:
            self._idle_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def _uvicorn_server_class():
    import uvicorn

    class _Uvicorn(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals.clear()  # handled: shut down gracefully, exit 0

    return _Uvicorn


def exposure_warning(sc) -> str | None:
    """What `serve` warns about at start: a non-loopback address with no API key."""
    if sc.loopback or sc.api_key:
        return None
    return (f"serving on {sc.host} with no API key: anyone who can reach this address can use it "
            f"(set server.api_key or --api-key)")


def serve(cfg: Config, echo: Callable[[str], None] = print) -> None:
    """`mini-engine serve`: load the model, serve until signalled, shut down in order."""
    server = Server(cfg)
    sc, engine = cfg.server, server.engine
    warning = exposure_warning(sc)
    if warning:
        log.warning(warning)
    echo(f"note: {engine.kv_capacity}")
    for line in engine.notes:
        echo(f"note: {line}")
    server.run(lambda: echo(f"mini-engine: serving {server.model_name} ({cfg.backend.name}:{cfg.backend.device}) "
                            f"on {server.url}  (Ctrl-C stops)"))
    if server.request_log is not None:
        echo(f"mini-engine: request log {sc.log_csv}: {server.request_log.rows} rows written")
    echo("mini-engine: stopped")
