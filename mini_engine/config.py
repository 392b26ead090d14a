"""Config files (TOML), `--set section.key=value` overrides, and validation.

Precedence, lowest first: defaults < config file < --set < explicit CLI flags
or keyword arguments. Unknown keys and wrong types are one-line errors that
name the key and the expected type.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .core.scheduler_config import SchedulerConfig
from .server.ray_config import RayConfig
from .server.server_config import ServerConfig
from .errors import ConfigError
from .sampling import SamplingParams


# int8 / int4: weight-only (or dynamic) quantization; each backend says what it supports.
DTYPES = ("float32", "float16", "bfloat16", "int8", "int4")


@dataclass
class ModelConfig:
    source: str = "random:gpt2"
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")


@dataclass
class BackendConfig:
    """`options` as written may hold a table per backend ([backend.options.torch], ...) and flat
    keys; after construction it holds what the selected backend runs with (see `options_for`),
    and `written_options` keeps the written form so that selecting another backend later (a
    CLI flag over a loaded config) resolves again from what the user wrote."""

    name: str = "torch"
    device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.written_options = _deep_copy(self.options)
        self.options = options_for(self.written_options, self.name, self.name)
        _validate_options(self.written_options, self.name)

    def options_for(self, backend: str) -> dict[str, Any]:
        """The options `backend` would run with from this config (its own table, plus the flat
        keys when it is the selected backend)."""
        return options_for(self.written_options, self.name, backend)


def options_for(written: Mapping[str, Any], selected: str, backend: str) -> dict[str, Any]:
    """The flat options `backend` runs with, from `backend.options` as written for `selected`.

    A table named after an installed backend holds that backend's options and applies only when
    that backend runs, so one file can configure every backend and swapping is one line. Flat
    keys are the selected backend's own (backward compatible); they win over its table, so
    `--set backend.options.KEY=V` overrides a file's table. Any other backend ignores them.
    """
    tables, flat = _split_options(written)
    out = dict(tables.get(backend, {}))
    if backend == selected:
        out.update(flat)
    return out


def _split_options(written: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    # Only a table named after an installed backend is a per-backend table; any other key is a
    # flat option, so a misspelt table name is reported as an unknown option, not ignored.
    names = _backend_names()
    tables = {k: dict(v) for k, v in written.items() if k in names and isinstance(v, Mapping)}
    flat = {k: v for k, v in written.items() if k not in tables}
    return tables, flat


def _backend_names() -> set[str]:
    from .registry import backend_names

    return set(backend_names())


def _validate_options(written: Mapping[str, Any], selected: str) -> None:
    """Check the selected backend's options here, where it is known which key came from which
    table, so an error names the key as written; other backends' tables are theirs to check."""
    from .errors import MiniEngineError
    from .registry import get_backend

    try:
        cls = get_backend(selected)
    except MiniEngineError:
        return  # an unknown or broken backend is reported, with its reason, when it is loaded
    tables, flat = _split_options(written)
    table = tables.get(selected, {})
    if cls.Options is None:
        given = [f"backend.options.{selected}.{k}" for k in table] + [f"backend.options.{k}" for k in flat]
        if given:
            raise ConfigError(f"backend '{selected}' takes no options (got: {', '.join(given)})")
        return
    known = [f.name for f in dataclasses.fields(cls.Options)]
    unknown = [k for k in flat if k not in known]
    if unknown:
        others = sorted(n for n, t in tables.items() if unknown[0] in t and n != selected)
        hint = (f"; it is in [backend.options.{others[0]}], which applies when backend.name is '{others[0]}'"
                if others else f"; options of one backend go under [backend.options.<name>]")
        raise ConfigError(f"unknown config key 'backend.options.{unknown[0]}' for backend '{selected}' "
                          f"(known: {', '.join(known)}){hint}")
    build_dataclass(cls.Options, table, f"backend.options.{selected}")
    build_dataclass(cls.Options, flat, "backend.options")
    build_dataclass(cls.Options, table | flat, "backend.options")


@dataclass
class BatchingConfig:
    """Named after Triton's dynamic batcher settings."""

    max_batch_size: int = 16
    max_queue_delay_ms: float = 2.0
    preferred_batch_sizes: list[int] = field(default_factory=list)
    max_queue_size: int = 1024
    timeout_ms: float = 0.0  # 0 = requests never expire
    preserve_ordering: bool = False

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ConfigError(f"batching.max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_ms < 0:
            raise ConfigError("batching.max_queue_delay_ms must be >= 0")
        if self.max_queue_size < 1:
            raise ConfigError("batching.max_queue_size must be >= 1")
        if self.timeout_ms < 0:
            raise ConfigError("batching.timeout_ms must be >= 0")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ConfigError(f"batching.preferred_batch_sizes must lie in 1..max_batch_size, got {bad}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    generation: SamplingParams = field(default_factory=SamplingParams)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # continuous batching
    server: ServerConfig = field(default_factory=ServerConfig)  # mini-engine serve
    ray: RayConfig = field(default_factory=RayConfig)  # mini-engine serve --ray (Ray Serve replicas)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        # The written form, so that load_config(cfg.to_dict(), **{"backend.name": other}) gives
        # `other` its own table instead of the options resolved for this backend.
        d["backend"]["options"] = _deep_copy(self.backend.written_options)
        return d


def load_config(
    path: str | Path | Mapping[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    **sections: Any,
) -> Config:
    """Build a Config from a TOML file (or dict), `key=value` overrides and keyword sections.

    `sections` maps a dotted key to a value, e.g. {"backend.name": "onnxruntime"};
    None values are ignored so CLI flags that were not given do not override.
    """
    if path is None:
        raw: dict[str, Any] = {}
    elif isinstance(path, Mapping):
        raw = _deep_copy(path)
    else:
        raw = _read_toml(Path(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects section.key=value, got '{item}'")
        _set_dotted(raw, key.strip(), _parse_value(value.strip()))
    for key, value in sections.items():
        if value is not None:
            _set_dotted(raw, key, value)
    return build_dataclass(Config, raw, "")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file '{path}' is a directory") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None


def _parse_value(text: str) -> Any:
    """A TOML value (42, 1.5, true, [1, 2], "x"); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _deep_copy(m: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in m.items()}


def build_dataclass(cls: type, raw: Any, where: str) -> Any:
    """Instantiate dataclass `cls` from `raw`, checking keys and types recursively."""
    label = where or "config"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{label} must be a table/section, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known in {label}: {', '.join(fields)})"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{label}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str) and item is str:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list of {_name(item)}, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' expects a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"config key '{key}' expects {_name(tp)}, got {value!r}")


def _name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )
