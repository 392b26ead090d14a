"""The `[server]` config section of `mini-engine serve`."""
from __future__ import annotations

import ipaddress
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
    request_timeout_s: float = 600.0  # 0 = never; past it: 504, and the request stops costing compute
    max_body_bytes: int = 1 << 20  # 413 past it
    log_csv: str = ""  # "" = no request log; else append one row per request to this CSV
    model_name: str = ""  # the id served in /v1/models; "" = the model source as configured
    cors: bool = False
    cors_origins: list[str] | None = None
    shutdown_grace_s: float = 30.0  # in-flight requests get this long to finish on SIGINT/SIGTERM
    access_log: bool = False

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port must be in 0..65535 (0 = any free port), got {self.port}")
        for name in ("max_concurrent_requests", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "shutdown_grace_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"server.{name} must be >= 0, got {getattr(self, name)}")
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
