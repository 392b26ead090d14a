"""Options and helpers shared by the CLI's commands."""
from __future__ import annotations

import click


def config_options(f):
    """--config/--set/--model/--backend/--device/--dtype, shared by every command that builds an engine."""
    f = click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                     help="Weight/compute dtype (model.dtype).")(f)
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
    if source_spec.startswith("random:"):
        click.echo(f"note: {source_spec} has seeded random weights: timings are real, the text is meaningless",
                   err=True)
