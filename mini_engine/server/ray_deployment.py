"""The Ray Serve deployment: each replica is one engine (continuous batching on its own loop
thread) behind the same FastAPI app as `mini-engine serve`, as Ray Serve's ingress.

Ray Serve's HTTP proxy routes each request to a replica (power of two choices on ongoing
requests), caps every replica at `max_ongoing_requests` = server.max_concurrent_requests, and
restarts a replica that dies or fails its health check. `app_builder` is the import path a Ray
Serve config file names (`serve run` / `serve deploy`); `serve_config_yaml` writes that file.

Only this module and ray_launcher import Ray, and only once Ray was asked for.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Mapping

from ..config import Config, load_config
from ..errors import ConfigError

log = logging.getLogger("mini_engine.server")

REPLICA_HEADER = "x-mini-engine-replica"  # names the replica that answered (tests, debugging)
IMPORT_PATH = "mini_engine.server.ray_deployment:app_builder"


class ReplicaHeader:
    """Adds the answering replica's id to every response, so a client can tell replicas apart."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), self.header]
            await send(message)

        return await self.app(scope, receive, tagged)


class EngineReplica:
    """One replica: model loaded and warmed up in the constructor (Ray Serve routes nothing to a
    replica before its constructor returns), the app built from its ServerState afterwards."""

    async def __init__(self, config: Mapping[str, Any]):
        from prometheus_client import disable_created_metrics
        from ray import serve

        from .launcher import configure_logging

        disable_created_metrics()
        configure_logging()
        self.cfg = load_config(config)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.engine = self.async_engine = self.request_log = None
        self._closed = False
        # Loading and the warm-up block for seconds: off the replica's event loop, where Ray's
        # health checks and metrics pushes run.
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import time

        from ..async_engine import AsyncEngine
        from ..engine import Engine
        from ..sampling import SamplingParams
        from .request_log import RequestLog
        from .state import ServerState

        cfg, sc = self.cfg, self.cfg.server
        try:
            self.engine = Engine(config=cfg)
            if not self.engine.continuous:
                raise ConfigError(f"the server needs continuous batching, which this configuration lacks: "
                                  f"{self.engine.static_reason}")
            self.async_engine = AsyncEngine(self.engine, max_stream_backlog=sc.max_stream_backlog)
            t = time.perf_counter()
            # As `mini-engine serve`: kernels compile now, not in the first user's TTFT.
            self.async_engine.generate([self.engine.tokenizer.eos_token_id] * 20, SamplingParams(max_new_tokens=2))
            warmup_s = time.perf_counter() - t
            if sc.log_csv:
                # One file per replica: replicas are separate processes, possibly on other nodes.
                p = Path(sc.log_csv)
                self.request_log = RequestLog(str(p.with_name(f"{p.stem}-{self.replica}{p.suffix}")),
                                              cfg.backend.name, cfg.backend.device)
        except BaseException:
            self.close()
            raise
        self.state = ServerState(self.async_engine, sc, sc.model_name or cfg.model.source, self.request_log)
        import os
        import sys

        torch = sys.modules.get("torch")  # its threads follow OMP_NUM_THREADS, which Ray sets from num_cpus
        threads = f"torch threads {torch.get_num_threads()}, " if torch is not None else ""
        log.info("replica %s: %s (%s:%s) ready after a %.2f s warm-up; %sOMP_NUM_THREADS=%s; %s", self.replica,
                 self.state.model_name, cfg.backend.name, cfg.backend.device, warmup_s, threads,
                 os.environ.get("OMP_NUM_THREADS", "unset"), self.engine.kv_capacity)

    def __serve_build_asgi_app__(self):
        from .app import build_app

        app = build_app(self.state)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app

    def check_health(self) -> None:
        """Ray Serve's periodic probe: a replica whose engine loop died is replaced."""
        if not self.async_engine.is_alive:
            raise RuntimeError(f"the engine loop of replica {self.replica} is not running: {self.async_engine.error}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.async_engine is not None:
            self.async_engine.close()
        if self.engine is not None:
            self.engine.close()
        if self.request_log is not None:
            self.request_log.close()

    def __del__(self):
        # Ray Serve calls this once ongoing requests drained (graceful_shutdown_timeout_s).
        self.close()


def replica_config(cfg: Config) -> dict[str, Any]:
    """What a replica builds its engine and app from: the config without the [ray] section."""
    d = cfg.to_dict()
    d.pop("ray", None)
    return d


def num_gpus(cfg: Config) -> float:
    rc, device = cfg.ray, cfg.backend.device
    if device.startswith("cuda") and device not in ("cuda", "cuda:0"):
        raise ConfigError(f"under Ray backend.device must be 'cuda', not '{device}': Ray gives each replica its "
                          f"own GPUs (CUDA_VISIBLE_DEVICES), where they are numbered from 0")
    if rc.num_gpus_per_replica >= 0:
        if device.startswith("cuda") and rc.num_gpus_per_replica == 0:
            raise ConfigError("backend.device is cuda but ray.num_gpus_per_replica = 0: Ray would give the "
                              "replicas no GPU; set it to 1 (or -1, auto)")
        return rc.num_gpus_per_replica
    return 1.0 if device.startswith("cuda") else 0.0


def deployment_options(cfg: Config) -> dict[str, Any]:
    """Ray Serve deployment options from the config (also what the Serve config file holds)."""
    rc, sc = cfg.ray, cfg.server
    opts: dict[str, Any] = {}
    if rc.autoscaling:
        opts["autoscaling_config"] = {
            "min_replicas": rc.min_replicas, "max_replicas": rc.max_replicas,
            "initial_replicas": max(rc.min_replicas, 1),
            "target_ongoing_requests": rc.target_ongoing_requests or float(cfg.scheduler.max_num_seqs),
            "upscale_delay_s": rc.upscale_delay_s, "downscale_delay_s": rc.downscale_delay_s}
    else:
        opts["num_replicas"] = rc.num_replicas
    # The proxy never sends a replica more than its own admission limit, so the replica's 429
    # stays for requests of several prompts; the rest wait in Ray's router (max_queued_requests).
    opts["max_ongoing_requests"] = sc.max_concurrent_requests
    opts["max_queued_requests"] = rc.max_queued_requests
    opts["ray_actor_options"] = {"num_cpus": rc.num_cpus_per_replica, "num_gpus": num_gpus(cfg)}
    opts["health_check_period_s"] = rc.health_check_period_s
    opts["health_check_timeout_s"] = rc.health_check_timeout_s
    opts["graceful_shutdown_timeout_s"] = sc.shutdown_grace_s
    return opts


def application(cfg: Config):
    """The Ray Serve application (bound deployment) serving `cfg`."""
    from ray import serve

    cls = serve.deployment(serve.ingress()(EngineReplica), name=cfg.ray.deployment_name, **deployment_options(cfg))
    return cls.bind(replica_config(cfg))


def app_builder(args: Mapping[str, Any]):
    """Ray Serve's application builder (`import_path` of a Serve config, or `serve run
    mini_engine.server.ray_deployment:app_builder config=FILE.toml`): `config` is a mini-engine
    config (a TOML path or a table), `set` a list of `section.key=value` overrides."""
    args = dict(args or {})
    source = args.pop("config", None)
    overrides = args.pop("set", ())
    if isinstance(overrides, str):
        overrides = [overrides]
    if args:
        raise ConfigError(f"unknown app_builder argument(s): {', '.join(sorted(args))} (known: config, set)")
    return application(load_config(source, list(overrides)))


def serve_config(cfg: Config) -> dict[str, Any]:
    """A Ray Serve config (what `serve run FILE` / `serve deploy FILE` read) for `cfg`."""
    sc, rc = cfg.server, cfg.ray
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": sc.host, "port": sc.port},
        "applications": [{
            "name": rc.app_name,
            "route_prefix": "/",
            "import_path": IMPORT_PATH,
            "args": {"config": replica_config(cfg)},
            "deployments": [{"name": rc.deployment_name, **deployment_options(cfg)}],
        }],
    }


def serve_config_yaml(cfg: Config) -> str:
    import yaml

    head = ("# Ray Serve config for mini-engine, written by `mini-engine serve --ray --write-serve-config`.\n"
            "#   serve run THIS_FILE          (starts a local Ray cluster, or joins RAY_ADDRESS)\n"
            "#   serve deploy THIS_FILE       (to a running cluster: ray start --head first)\n"
            "# `args.config` is the whole mini-engine config each replica builds its engine from;\n"
            "# `deployments` (replicas, autoscaling, CPUs/GPUs per replica) override the code's options.\n")
    return head + yaml.safe_dump(serve_config(cfg), sort_keys=False, default_flow_style=False)
