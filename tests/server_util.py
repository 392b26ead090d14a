"""Start the real server (uvicorn on 127.0.0.1, an OS-chosen free port) for a test."""
from __future__ import annotations

import contextlib
import time

import httpx


@contextlib.contextmanager
def running_server(model: str = "random:tiny", backend: str = "torch", overrides: dict | None = None):
    from mini_engine.config import load_config
    from mini_engine.server.launcher import Server

    keys = {"model.source": model, "backend.name": backend, "server.host": "127.0.0.1", "server.port": 0,
            "server.shutdown_grace_s": 5.0}
    keys.update(overrides or {})
    server = Server(load_config(None, **keys)).start()
    try:
        yield server
    finally:
        server.stop()


def wait_idle(url: str, timeout: float = 20.0, headers: dict | None = None) -> dict:
    """Poll /stats until nothing is admitted, running or waiting; returns the last stats."""
    deadline = time.monotonic() + timeout
    stats = {}
    while time.monotonic() < deadline:
        stats = httpx.get(f"{url}/stats", headers=headers, timeout=5).json()
        if stats["admitted"] == 0 and stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_usage"] == 0:
            return stats
        time.sleep(0.05)
    raise AssertionError(f"the server did not go idle in {timeout} s: {stats}")
