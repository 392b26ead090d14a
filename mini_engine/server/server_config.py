"""The `[server]` config section of `mini-engine serve`."""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str = ""  # "" = no key; else every route but /health needs `Authorization: Bearer KEY`
    # Requests admitted at once (queued in the engine or running); past it a request is refused
    # at once with 429 and Retry-After instead of queueing without bound.
    max_concurrent_requests: int = 256
    # What one request may ask for (400 naming the limit past them): prompts in one
    # /v1/completions body; tokens it may hold in the KV cache, the sum over its prompts of
    # prompt + max_tokens; and logprobs x prompts.
    max_prompts_per_request: int = 32
    max_tokens_per_request: int = 32768
    max_logprobs_per_request: int = 64
    request_timeout_s: float = 600.0  # 0 = never; past it: 504, and the request stops costing compute
    # A streaming client that falls this many token increments behind (it stopped reading) has its
    # request aborted: it stops costing compute and memory.
    max_stream_backlog: int = 256
    # Open connections at most (past it uvicorn answers 503), and how long a connection may take
    # to send its request's headers, or sit idle between requests, before it is closed.
    max_connections: int = 1024
    header_timeout_s: float = 10.0
    max_body_bytes: int = 1 << 20  # 413 past it
    log_csv: str = ""  # "" = no request log; else append one row per request to this CSV
    model_name: str = ""  # the id served in /v1/models; "" = the model source as configured
    cors: bool = False
    cors_origins: list[str] | None = None
    # In-flight requests get this long to finish on SIGINT/SIGTERM (0: stop at once); then the
    # rest are cancelled and the process exits.
    shutdown_grace_s: float = 30.0
    access_log: bool = False

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port must be in 0..65535 (0 = any free port), got {self.port}")
        for name in ("max_concurrent_requests", "max_body_bytes", "max_prompts_per_request", "max_tokens_per_request",
                     "max_logprobs_per_request", "max_stream_backlog", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "shutdown_grace_s"):
            if not getattr(self, name) >= 0 or math.isinf(getattr(self, name)):
                raise ConfigError(f"server.{name} must be a finite number >= 0, got {getattr(self, name)}")
        if not 0 < self.header_timeout_s < math.inf:
            raise ConfigError(f"server.header_timeout_s must be a finite number > 0, got {self.header_timeout_s}")
        if not self.host:
            raise ConfigError("server.host must not be empty (127.0.0.1 serves this machine only)")

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
