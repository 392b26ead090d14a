"""Options and helpers shared by the CLI's commands."""
from __future__ import annotations

import click


def config_options(f):
    """--config/--set/--model/--backend/--device/--dtype, shared by every command that builds an engine."""
    f = click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16", "int8", "int4"]), default=None,
                     help="Weight/compute dtype (model.dtype); int8/int4 quantize the weights where the backend can.")(f)
    f = click.option("--device", default=None, help="cpu or cuda[:N] (backend.device).")(f)
    f = click.option("--backend", "-b", default=None, help="Backend name (backend.name); see `mini-engine backends`.")(f)
    f = click.option("--model", "-m", default=None,
                     help="random:gpt2|random:gpt2-medium|...|random:tiny, a checkpoint directory, or a cached hub id.")(f)
    f = click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                     help="Override a config key (repeatable), e.g. --set backend.options.threads=2.")(f)
    f = click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="TOML config file (see configs/).")(f)
    return f


def build_config(config_path, overrides, model, backend, device, dtype):
    from ..config import load_config

    return load_config(config_path, overrides, **{"model.source": model, "backend.name": backend,
                                                  "backend.device": device, "model.dtype": dtype})


def note_random(source_spec: str) -> None:
    origin = random_origin(source_spec)
    if origin is None:
        return
    what = origin if origin == source_spec else f"{source_spec} is an export of {origin}, which"
    click.echo(f"note: {what} has seeded random weights: timings are real, the text is meaningless", err=True)


def random_origin(source_spec: str) -> str | None:
    """The random:<preset> whose seeded weights `source_spec` holds: itself, or for an ONNX export
    what its manifest says it was made from; None for real weights or a spec that does not resolve."""
    import json

    from ..errors import MiniEngineError
    from ..model.source import MANIFEST, RANDOM_PREFIX, resolve_model

    if source_spec.startswith(RANDOM_PREFIX):
        return source_spec
    try:
        source = resolve_model(source_spec)
        if source.kind != "onnx":
            return None
        model = json.loads((source.path / MANIFEST).read_text()).get("model", {})
    except (MiniEngineError, OSError, ValueError, AttributeError):
        return None  # resolving reports a bad spec where it matters; a note must not fail
    return model.get("spec") if model.get("kind") == "random" else None


def check_device(cfg) -> None:
    """A device the backend never supports is a config mistake, but when the backend could not run
    here on any device the user also needs that reason (e.g. tensorrt on a CPU-only machine: no
    TensorRT and no GPU), so say both in the one error line."""
    from ..errors import ConfigError
    from ..registry import get_backend

    problem = get_backend(cfg.backend.name).device_problem(cfg.backend.device)
    if problem:
        raise ConfigError(problem)
