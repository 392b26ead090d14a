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
@click.option("--ray/--no-ray", "use_ray", default=None, show_default="ray.enabled, off",
              help="Serve through Ray Serve: replicas of the engine behind Ray Serve's HTTP proxy "
                   "(needs: pip install 'mini-engine[ray]').")
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="With --ray: this many replicas, one engine each (ray.num_replicas).")
@click.option("--autoscale", metavar="MIN:MAX", default=None,
              help="With --ray: autoscale between MIN and MAX replicas on ongoing requests per replica "
                   "(ray.min_replicas / ray.max_replicas).")
@click.option("--ray-address", default=None,
              help="With --ray: join this Ray cluster (auto, or HEAD:6379) instead of starting a local one (ray.address).")
@click.option("--write-serve-config", type=click.Path(dir_okay=False), default=None,
              help="With --ray: write a Ray Serve config (for `serve run` / `serve deploy`) of this configuration "
                   "to FILE and exit.")
def command(config_path, overrides, model, backend, device, dtype, host, port, api_key, log_csv,
            max_concurrent_requests, request_timeout_s, use_ray, replicas, autoscale, ray_address,
            write_serve_config):
    """Serve the model over HTTP: OpenAI's /v1/completions (streaming and not), /generate,
    /generate/stream, /v1/models, /health and Prometheus /metrics; with --ray, as replicas on Ray Serve."""
    from ..config import load_config
    from ..errors import ConfigError

    cfg = build_config(config_path, overrides, model, backend, device, dtype)
    flags = {"server.host": host, "server.port": port, "server.api_key": api_key, "server.log_csv": log_csv,
             "server.max_concurrent_requests": max_concurrent_requests,
             "server.request_timeout_s": request_timeout_s, "ray.enabled": use_ray, "ray.num_replicas": replicas,
             "ray.address": ray_address}
    if replicas is not None and autoscale is not None:
        raise ConfigError("--replicas and --autoscale exclude each other: a fixed count or a range")
    if autoscale is not None:
        from ..server.ray_config import parse_autoscale

        flags["ray.min_replicas"], flags["ray.max_replicas"] = parse_autoscale(autoscale)
    elif replicas is not None:
        flags["ray.max_replicas"] = 0  # a fixed count given on the command line wins over a file's autoscaling
    if any(v is not None for v in flags.values()):
        cfg = load_config(cfg.to_dict(), **flags)
    ray_only = {"--replicas": replicas, "--autoscale": autoscale, "--ray-address": ray_address,
                "--write-serve-config": write_serve_config}
    given = [name for name, v in ray_only.items() if v is not None]
    if given and not cfg.ray.enabled:
        raise ConfigError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to serving on Ray; add --ray")
    check_device(cfg)
    echo = lambda line: click.echo(line, err=True)  # noqa: E731
    if cfg.ray.enabled:
        from ..server.ray_config import require_ray

        require_ray()
        if write_serve_config:
            _write_serve_config(cfg, write_serve_config, echo)
            return
        from ..server.ray_launcher import serve_on_ray

        note_random(cfg.model.source)
        serve_on_ray(cfg, echo=echo)
        return
    from ..server.launcher import serve

    note_random(cfg.model.source)
    serve(cfg, echo=echo)


def _write_serve_config(cfg, path, echo) -> None:
    from pathlib import Path

    from ..errors import ConfigError
    from ..server.ray_deployment import num_gpus, serve_config_yaml

    if cfg.server.port == 0:
        raise ConfigError("a Ray Serve config needs a fixed port (server.port / --port), not 0")
    num_gpus(cfg)  # a device Ray cannot map is an error now, not when the file is deployed
    try:
        Path(path).write_text(serve_config_yaml(cfg))
    except OSError as e:
        raise ConfigError(f"cannot write the Ray Serve config '{path}': {e.strerror or e}") from None
    if cfg.server.api_key:
        echo(f"note: {path} holds server.api_key in clear text (the replicas read it from there)")
    echo(f"mini-engine: wrote the Ray Serve config {path}; run it with: serve run {path}")
