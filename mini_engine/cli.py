"""The `mini-engine` command line."""
from __future__ import annotations

import json
import os
import sys
import traceback

import click

from .commands import register_commands
from .commands.common import build_config, check_device, config_options, note_random
from .errors import MiniEngineError


class _Group(click.Group):
    """Turns user errors into one line on stderr and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except MiniEngineError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.Abort() from None
        except Exception as e:
            if os.environ.get("MINI_ENGINE_DEBUG"):
                traceback.print_exc()
            raise click.ClickException(
                f"internal error: {type(e).__name__}: {e} (set MINI_ENGINE_DEBUG=1 for the traceback)"
            ) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mini-engine")
def cli():
    """Run GPT-2-family models on PyTorch, ONNX Runtime and TensorRT, and compare them."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def backends(as_json):
    """List installed backends and whether they can run here."""
    from .registry import list_backends

    infos = list_backends()
    if as_json:
        click.echo(json.dumps([i.to_dict() for i in infos], indent=2))
        return
    rows = [("name", "available", "devices", "version", "batching", "entry point / reason")]
    for i in infos:
        rows.append((i.name, "yes" if i.available else "no", ",".join(i.devices) or "-", i.version or "-",
                     i.batching, i.entry_point if i.available else f"{i.entry_point}: {i.reason}"))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:
        click.echo("  ".join(r[c].ljust(widths[c]) for c in range(5)) + "  " + r[5])


@cli.command()
@config_options
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=None,
              show_default="generation.max_new_tokens, 32 unless the config sets it",
              help="Tokens to generate per prompt; prompt + this must fit the context window.")
@click.option("--temperature", "-t", type=click.FloatRange(min=0), default=None, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=None)
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--truncate", is_flag=True, default=None,
              help="Cut a prompt that does not fit the context window together with --max-new-tokens to its "
                   "last tokens (otherwise that is an error).")
@click.option("--ignore-eos", is_flag=True, default=None, help="Keep generating past <|endoftext|>.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per prompt (README: which timings are per request, which per batch).")
@click.argument("prompts", nargs=-1, required=True)
def generate(config_path, overrides, model, backend, device, dtype, max_new_tokens, temperature, top_k,
             top_p, seed, stop, truncate, ignore_eos, as_json, prompts):
    """Generate text for each PROMPT."""
    from .engine import Engine

    cfg = build_config(config_path, overrides, model, backend, device, dtype)
    check_device(cfg)
    with Engine(config=cfg) as engine:
        note_random(cfg.model.source)  # after loading, so a bad input still gets exactly one error line
        gen = engine.describe()["generation"]
        if engine.continuous:
            click.echo(f"note: continuous batching; {engine.kv_capacity}", err=True)
            for line in engine.notes:
                click.echo(f"note: {line}", err=True)
        else:
            click.echo(f"note: static batching ({gen['reason']})", err=True)
        params = engine.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, seed=seed, stop=list(stop) or None,
                                        truncate=truncate, ignore_eos=ignore_eos)
        completions = engine.generate(list(prompts), params)
        per_request = engine.continuous
    target = f"{cfg.backend.name}:{cfg.backend.device}"
    for c in completions:
        if as_json:
            click.echo(json.dumps(completion_json(c, per_request)
                                  | {"backend": cfg.backend.name, "device": cfg.backend.device}))
        else:
            click.echo(c.prompt + c.text)
            timing = (f"TTFT {c.ttft_ms:.0f} ms, {c.tokens_per_s:.1f} tokens/s" if per_request else
                      f"batch TTFT {c.ttft_ms:.0f} ms, {c.tokens_per_s:.1f} tokens/s since its batch started")
            click.echo(f"[{target}] {len(c.token_ids)} tokens, finish={c.finish_reason}, {timing}", err=True)


# Under static batching (backends without the paged KV contract) prompts run max_batch_size at a
# time and a Completion's times count from the start of its batch: every prompt of a batch gets
# its first token from the same prefill, and later batches leave out the wait for earlier ones.
# Those are batch figures, so they carry batch names (and queue_ms, never measured there, is
# left out); under continuous batching they are the request's own, from the generate() call.
BATCH_TIMINGS = {"ttft_ms": "batch_ttft_ms", "total_ms": "batch_total_ms", "tokens_per_s": "batch_tokens_per_s",
                 "tpot_ms": "batch_tpot_ms"}


def completion_json(c, per_request: bool) -> dict:
    d = c.to_dict()
    if per_request:
        return d
    return {BATCH_TIMINGS.get(k, k): v for k, v in d.items() if k != "queue_ms"}


register_commands(cli)


def main() -> None:
    cli(prog_name="mini-engine")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
