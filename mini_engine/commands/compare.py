"""`mini-engine compare`: does every backend mean the same thing, and which is faster?"""
from __future__ import annotations

import json

import click

from .common import build_config, config_options, note_random


@click.command("compare")
@config_options
@click.option("--backends", "targets", required=True, metavar="B[:DEV],B[:DEV],...",
              help="Backends to compare, e.g. torch:cpu,onnxruntime:cpu.")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
              help="Text file, one prompt per line (default: a few built-in prompts).")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--atol", type=click.FloatRange(min=0), default=1e-3, show_default=True,
              help="Largest allowed max |logit difference| between any two backends.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(config_path, overrides, model, backend, device, dtype, targets, prompts_file, max_new_tokens, atol,
            as_json):
    """Run the same prompts greedily through each backend (one process each) and compare logits,
    tokens and latency. Exits non-zero when a pair differs by more than --atol."""
    from ..compare import compare_all, parse_targets, read_prompts, run_backend, to_json
    from ..model.source import resolve_model

    cfg = build_config(config_path, overrides, model, backend, device, dtype)
    pairs_wanted = parse_targets(targets)
    prompts = read_prompts(prompts_file)
    resolve_model(cfg.model.source)  # a bad --model is one error here, not one per backend
    note_random(cfg.model.source)
    runs = []
    for name, dev in pairs_wanted:
        if not as_json:
            click.echo(f"running {name}:{dev} ...", err=True)
        runs.append(run_backend(cfg.to_dict(), name, dev, prompts, max_new_tokens))
    pairs = compare_all(runs, atol)
    if as_json:
        click.echo(json.dumps(to_json(runs, pairs, atol), indent=2))
    else:
        _print_tables(runs, pairs, atol, len(prompts), max_new_tokens)
    if sum(r.available for r in runs) < 2:
        raise click.ClickException("fewer than two backends ran, nothing to compare")
    failed = [p for p in pairs if not p["passed"]]
    if failed:
        p = failed[0]
        raise click.ClickException(f"{p['a']} vs {p['b']}: max |logit diff| {p['max_abs_diff']:.2e} > atol {atol:g}")


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _print_tables(runs, pairs, atol, n_prompts, n_tokens) -> None:
    click.echo(f"{n_prompts} prompts, {n_tokens} greedy tokens each, batch 1\n")
    rows = [("backend", "prefill ms", "decode ms/token", "load s", "status")]
    for r in runs:
        if r.available:
            rows.append((r.target, f"{r.prefill_ms:.2f}", f"{r.decode_ms:.2f}", f"{r.load_s:.1f}", "ok"))
        else:
            rows.append((r.target, "-", "-", "-", f"unavailable: {r.reason}"))
    _table(rows)
    if not pairs:
        return
    click.echo("")
    rows = [("pair", "max|dlogit|", "mean|dlogit|", "top-1", "same tokens", "first divergence", "result")]
    for p in pairs:
        div = [d for d in p["first_divergence"] if d is not None]
        rows.append((f"{p['a']} vs {p['b']}", f"{p['max_abs_diff']:.2e}", f"{p['mean_abs_diff']:.2e}",
                     f"{p['top1_agreement']:.1%}", f"{p['prompts_identical']}/{p['prompts']}",
                     f"token {min(div)}" if div else "-", "pass" if p["passed"] else f"FAIL (atol {atol:g})"))
    _table(rows)
