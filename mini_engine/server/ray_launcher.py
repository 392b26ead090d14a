"""`mini-engine serve --ray`: a Ray cluster (local, or joined), Ray Serve's HTTP proxy on
server.host:server.port, the mini-engine application on it, and back down in order.

SIGINT/SIGTERM: the application is deleted (Ray Serve lets each replica's ongoing requests
finish for up to server.shutdown_grace_s, then stops its engine), then Serve and the local
cluster are shut down, so no raylet, gcs_server or worker outlives the command. On a joined
cluster only this application is removed; the cluster and its Serve keep running.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from typing import Callable

from ..config import Config
from ..errors import ConfigError, MiniEngineError
from .ray_config import require_ray

log = logging.getLogger("mini_engine.server")


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """A taken port is one line now, not a proxy actor that retries in the background."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"Ray Serve's proxy cannot listen on {host}:{port}: {e.strerror or e}") from None


def check_cluster(address: str) -> None:
    """Ray's own connect retries for minutes, deaf to signals, when nothing answers: one line now."""
    if address == "auto" or "://" in address:
        return  # "auto" is looked up by Ray (it fails fast); ray:// is Ray Client's
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"ray.address must be 'auto' or HOST:PORT (the head's GCS port, 6379 by default), "
                          f"got '{address}'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one there with "
                          f"`ray start --head --port {port}`, or leave out --ray-address for a local one") from None


def local_num_cpus(cfg: Config) -> float:
    rc = cfg.ray
    return rc.local_num_cpus or max(1.0, rc.most_replicas * rc.num_cpus_per_replica)


class _Stop(Exception):
    """SIGTERM, turned into an exception in the main thread like SIGINT's KeyboardInterrupt."""


def _raise_stop(signum, frame):
    raise _Stop()


def serve_on_ray(cfg: Config, echo: Callable[[str], None] = print) -> None:
    """Serve `cfg` on Ray Serve until SIGINT/SIGTERM, then tear everything down."""
    require_ray()
    rc, sc = cfg.ray, cfg.server
    if sc.port == 0:
        cfg.server.port = free_port(sc.host)  # Ray Serve's proxy needs the port up front
    if rc.address:
        check_cluster(rc.address)
    else:
        check_port(sc.host, sc.port)
        from ..model.source import resolve_model

        # A model that is not here is one line now, not three failed replica starts (the
        # replicas of a local cluster see this machine's files; a joined cluster's nodes may not).
        resolve_model(cfg.model.source)
    from .launcher import exposure_warning

    warning = exposure_warning(sc)
    if warning:
        echo(f"warning: {warning}")
    # Telemetry off for a cluster this command starts (it would try the network from every
    # node); the environment wins.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    ray_started = False
    try:
        import ray
        from ray import serve

        from .ray_deployment import application

        if rc.address:
            echo(f"mini-engine: joining the Ray cluster at {rc.address}")
            ray_started = True  # before init: a signal during it still gets the teardown
            try:
                ray.init(address=rc.address, log_to_driver=True)
            except (ConnectionError, RuntimeError) as e:
                raise MiniEngineError(
                    f"could not join the Ray cluster at {rc.address}: {_first_line(e)}; a cluster with token "
                    f"authentication (Ray's default for new clusters) needs RAY_AUTH_MODE=token and its token "
                    f"(~/.ray/auth_token or RAY_AUTH_TOKEN) when the address is given explicitly") from None
        else:
            cpus = local_num_cpus(cfg)
            echo(f"mini-engine: starting a local Ray cluster ({cpus:g} CPUs, no dashboard)")
            ray_started = True
            # "local": a new cluster even when RAY_ADDRESS or a `ray start` record names another.
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     object_store_memory=rc.local_object_store_mib * 2**20, log_to_driver=True)
        # ray.init replaced the SIGTERM handler (with a sys.exit) and its core worker added a
        # crash-report one: ours again, so SIGTERM is a clean stop like SIGINT.
        signal.signal(signal.SIGTERM, _raise_stop)
        serve.start(http_options={"host": sc.host, "port": sc.port})
        url = _proxy_url(sc.host, sc.port)
        echo(f"mini-engine: deploying {rc.describe()} of {cfg.model.source} ({cfg.backend.name}:{cfg.backend.device}, "
             f"{rc.num_cpus_per_replica:g} CPU / replica) on Ray Serve")
        try:
            serve.run(application(cfg), name=rc.app_name, route_prefix="/", blocking=False)
        except (KeyboardInterrupt, _Stop):
            raise
        except Exception as e:  # noqa: BLE001 - Ray's deploy failure carries the replica's traceback
            raise MiniEngineError(f"the Ray Serve deployment did not start: {_first_line(e)} "
                                  f"(the replicas' logs are above)") from None
        echo(f"mini-engine: serving {sc.model_name or cfg.model.source} on Ray Serve at {url}  (Ctrl-C stops)")
        while True:
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        # A second signal must not cut the teardown short and leave Ray processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if ray_started and ray.is_initialized():
                echo("mini-engine: stopping (ongoing requests finish first)")
                _teardown(cfg)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)
    echo("mini-engine: stopped")


def _teardown(cfg: Config) -> None:
    import threading

    import ray
    from ray import serve

    def stop_serve():
        # Deleting the application first drains and stops our replicas; serve.shutdown() alone
        # takes its controller's slower path (tens of seconds here) to the same end.
        with contextlib.suppress(Exception):
            serve.delete(cfg.ray.app_name)
        if not cfg.ray.address:
            with contextlib.suppress(Exception):
                serve.shutdown()

    # Bounded: a SIGTERM sent to the whole process group (`timeout`, some supervisors) kills the
    # raylet too, and Ray's calls then wait a minute for it. ray.shutdown() still stops the rest,
    # and the local cluster's processes die with this one anyway (Ray's fate sharing).
    t = threading.Thread(target=stop_serve, name="serve-teardown", daemon=True)
    t.start()
    t.join(cfg.server.shutdown_grace_s + 15)
    if t.is_alive():
        log.warning("Ray Serve did not shut down within %.0f s; stopping Ray anyway", cfg.server.shutdown_grace_s + 15)
    ray.shutdown()


def _proxy_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Ray's message ends with the replica's exception ("ConfigError: ..."): that is the cause.
    causes = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
    return causes[-1] if causes else lines[0]
