"""CLI subcommands beyond `backends` and `generate`, one module each.

Each module defines a click command (or group) named `command` and must not
import heavy libraries at module level: `mini-engine --help` imports them all.
"""
from __future__ import annotations

import importlib

import click

MODULES = ("export", "compare", "bench", "serve", "load", "analyze")


def register_commands(group: click.Group) -> None:
    for name in MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue  # not written yet
            raise
        group.add_command(module.command)
