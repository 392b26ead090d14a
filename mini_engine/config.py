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

from .errors import ConfigError
from .sampling import SamplingParams


@dataclass
class ModelConfig:
    source: str = "random:gpt2"
    dtype: str = "float32"

    def __post_init__(self):
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"model.dtype must be float32, float16 or bfloat16, got '{self.dtype}'")


@dataclass
class BackendConfig:
    name: str = "torch"
    device: str = "cpu"
    # Backend-specific keys, validated by the backend's own Options dataclass.
    options: dict[str, Any] = field(default_factory=dict)


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
