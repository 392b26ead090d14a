"""`mini-engine serve`: the OpenAI-compatible HTTP server (mini_engine.server)."""
from __future__ import annotations

import click

from .common import build_config, check_device, config_options, note_random


@click.command("serve")
@config_options
@click.option("--host", default=None, show_default="server.host, 127.0.0.1",
              help="Address to listen on; anything but loopback is reachable from other machines.")
@click.option("--port", type=click.IntRange(0, 65535), default=None, show_default="server.port, 8000",
              help="Port (0 = any free port).")
@click.option("--api-key", default=None, envvar="MINI_ENGINE_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every route but /health.")
@click.option("--log-csv", type=click.Path(dir_okay=False), default=None,
              help="Append one row per request to this CSV (server.log_csv); read it with `mini-engine analyze`.")
@click.option("--max-concurrent-requests", type=click.IntRange(min=1), default=None,
              help="Admitted requests at once; past it: 429 with Retry-After (server.max_concurrent_requests).")
@click.option("--request-timeout-s", type=click.FloatRange(min=0), default=None,
              help="Past it a request gets 504 and is aborted; 0 = never (server.request_timeout_s).")
def command(config_path, overrides, model, backend, device, dtype, host, port, api_key, log_csv,
            max_concurrent_requests, request_timeout_s):
    """Serve the model over HTTP: OpenAI's /v1/completions (streaming and not), /generate,
    /generate/stream, /v1/models, /health and Prometheus /metrics."""
    from ..config import load_config
    from ..server.launcher import serve

    cfg = build_config(config_path, overrides, model, backend, device, dtype)
    flags = {"server.host": host, "server.port": port, "server.api_key": api_key, "server.log_csv": log_csv,
             "server.max_concurrent_requests": max_concurrent_requests,
             "server.request_timeout_s": request_timeout_s}
    if any(v is not None for v in flags.values()):
        cfg = load_config(cfg.to_dict(), **flags)
    check_device(cfg)
    note_random(cfg.model.source)
    serve(cfg, echo=lambda line: click.echo(line, err=True))
