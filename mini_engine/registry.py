"""Backends are plugins: classes registered under the entry-point group
`mini_engine.backends`. This module finds them; it never imports a backend
module by name, and loading a backend class must not import its heavy library.
"""
from __future__ import annotations

import importlib.metadata
from dataclasses import asdict, dataclass

from .errors import BackendUnavailable, MiniEngineError
from .runner import Runner

GROUP = "mini_engine.backends"


@dataclass(frozen=True)
class BackendInfo:
    name: str
    entry_point: str
    distribution: str | None
    available: bool
    reason: str | None
    devices: tuple[str, ...]
    version: str | None
    # "continuous" when the runner implements the paged contract, else "static" (the engine
    # then runs static batching over StepInput for it).
    batching: str = "static"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["devices"] = list(self.devices)
        return d


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=GROUP):
        found.setdefault(ep.name, ep)  # first on sys.path wins, like imports
    return found


def backend_names() -> list[str]:
    return sorted(_entry_points())


def get_backend(name: str) -> type[Runner]:
    eps = _entry_points()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise BackendUnavailable(
            f"unknown backend '{name}' (installed: {known}); see `mini-engine backends`"
        )
    try:
        cls = eps[name].load()
    except Exception as e:
        raise BackendUnavailable(f"backend '{name}' ({eps[name].value}) failed to import: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Runner)):
        raise BackendUnavailable(f"backend '{name}' ({eps[name].value}) is not a mini_engine.Runner subclass")
    return cls


def list_backends() -> list[BackendInfo]:
    infos = []
    for name, ep in sorted(_entry_points().items()):
        dist = ep.dist.metadata["Name"] if ep.dist is not None else None
        try:
            cls = get_backend(name)
            avail = cls.availability()
        except MiniEngineError as e:
            infos.append(BackendInfo(name, ep.value, dist, False, str(e), (), None))
            continue
        infos.append(BackendInfo(name, ep.value, dist, avail.available, avail.reason,
                                 tuple(avail.devices), avail.version,
                                 f"continuous ({cls.kv_layout})" if cls.supports_paged else "static"))
    return infos
