"""The `[ray]` config section: `mini-engine serve` as a Ray Serve deployment of engine replicas.

Importing this module never imports Ray, so the config loader and the CLI stay fast and work
without the `ray` extra; `require_ray()` is where its absence becomes one error line.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

INSTALL_HINT = "pip install 'mini-engine[ray]'"


@dataclass
class RayConfig:
    enabled: bool = False  # serve through Ray Serve (also `mini-engine serve --ray`)
    # "" = start a local Ray cluster for this command (stopped with it); "auto" or "HOST:6379" =
    # join a running cluster (`ray start --head`), where the app is deleted again on exit.
    address: str = ""
    num_replicas: int = 1  # fixed replica count, unless max_replicas > 0
    # Autoscaling (Ray Serve's autoscaling_config) on ongoing requests per replica; on when
    # max_replicas > 0 (`--autoscale MIN:MAX`).
    min_replicas: int = 1
    max_replicas: int = 0
    # Ongoing requests per replica that autoscaling aims for; 0 = scheduler.max_num_seqs (a
    # replica past its batch has requests waiting in its engine, which another replica would run).
    target_ongoing_requests: float = 0.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    num_cpus_per_replica: float = 1.0  # Ray also sets OMP_NUM_THREADS to this in each replica
    num_gpus_per_replica: float = -1.0  # -1 = 1 when backend.device is cuda, else 0
    # Requests the router holds while every replica has server.max_concurrent_requests ongoing;
    # past it the proxy answers 503. -1 = unbounded (Ray's default).
    max_queued_requests: int = -1
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    # Logical CPUs of the local cluster; 0 = what the replicas ask for (max replicas times
    # num_cpus_per_replica), so the cluster never promises more than the replicas need.
    local_num_cpus: float = 0.0
    local_object_store_mib: int = 256  # the local cluster's shared-memory object store (unused by requests)
    app_name: str = "mini-engine"
    deployment_name: str = "MiniEngine"

    def __post_init__(self):
        for name in ("num_replicas", "min_replicas"):
            if getattr(self, name) < (1 if name == "num_replicas" else 0):
                raise ConfigError(f"ray.{name} must be >= {1 if name == 'num_replicas' else 0}, "
                                  f"got {getattr(self, name)}")
        if self.max_replicas < 0:
            raise ConfigError(f"ray.max_replicas must be >= 0 (0 = no autoscaling), got {self.max_replicas}")
        if self.autoscaling and self.max_replicas < max(self.min_replicas, 1):
            raise ConfigError(f"ray.max_replicas ({self.max_replicas}) must be >= ray.min_replicas "
                              f"({self.min_replicas}) and >= 1")
        for name in ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s", "local_num_cpus",
                     "num_cpus_per_replica"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ray.{name} must be >= 0, got {getattr(self, name)}")
        if self.num_gpus_per_replica < 0 and self.num_gpus_per_replica != -1:
            raise ConfigError(f"ray.num_gpus_per_replica must be >= 0 or -1 (auto), got {self.num_gpus_per_replica}")
        for name in ("health_check_period_s", "health_check_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"ray.{name} must be > 0, got {getattr(self, name)}")
        if self.max_queued_requests < 1 and self.max_queued_requests != -1:
            raise ConfigError(f"ray.max_queued_requests must be >= 1 or -1 (unbounded), got {self.max_queued_requests}")
        if self.local_object_store_mib < 80:
            raise ConfigError(f"ray.local_object_store_mib must be >= 80 (Ray's minimum is 75 MiB), "
                              f"got {self.local_object_store_mib}")
        for name in ("app_name", "deployment_name"):
            if not getattr(self, name):
                raise ConfigError(f"ray.{name} must not be empty")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas > 0

    @property
    def most_replicas(self) -> int:
        return self.max_replicas if self.autoscaling else self.num_replicas

    def describe(self) -> str:
        if self.autoscaling:
            return f"autoscaling {self.min_replicas}..{self.max_replicas} replicas"
        return f"{self.num_replicas} replica{'s' if self.num_replicas != 1 else ''}"


def parse_autoscale(text: str) -> tuple[int, int]:
    """`--autoscale MIN:MAX` -> (MIN, MAX), or one ConfigError line."""
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        pair = int(lo), int(hi)
    except ValueError:
        raise ConfigError(f"--autoscale expects MIN:MAX replicas, e.g. 1:4; got '{text}'") from None
    if pair[0] < 0 or pair[1] < max(pair[0], 1):
        raise ConfigError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return pair


def require_ray() -> None:
    """Ray is an optional extra: without it, one line that says how to install it."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"serving on Ray needs Ray Serve, which is not installed ({e}); "
                          f"install it with: {INSTALL_HINT}") from None
