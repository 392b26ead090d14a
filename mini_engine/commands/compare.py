"""`mini-engine compare`: does every backend mean the same thing, and which is faster?"""
from __future__ import annotations

import json

import click

from .common import build_config, config_options, note_random


@click.command("compare")
@config_options
@click.option("--targets", "--backends", "targets", required=True, metavar="B[:DEV][@DTYPE],...",
              help="Targets to compare, e.g. torch:cpu,onnxruntime:cpu or, precision variants, "
                   "torch:cpu@float32,onnxruntime:cpu@int8,torch:cpu@int8 (the first float32 target is the "
                   "reference).")
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False), default=None,
              help="Text file, one prompt per line (default: a few built-in prompts).")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None,
              help="Fixed text scored teacher-forced by every target (KL divergence, perplexity) "
                   "[a built-in paragraph].")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--atol", type=click.FloatRange(min=0), default=1e-3, show_default=True,
              help="Largest allowed max |logit difference| between two float targets (pairs with an int8/int4 "
                   "target are held to the quantization limits of export validation instead).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def command(config_path, overrides, model, backend, device, dtype, targets, prompts_file, text_file, max_new_tokens,
            atol, as_json):
    """Run the same prompts greedily through each target (one process each) and compare logits,
    tokens, next-token distributions on a fixed text, and latency. Exits non-zero when a pair
    differs by more than --atol (float pairs) or by more than quantization error (int8/int4)."""
    from ..compare import compare_all, parse_targets, read_prompts, read_text, run_backend, to_json
    from ..model.source import resolve_model
    from .common import random_origin

    cfg = build_config(config_path, overrides, model, backend, device, dtype)
    wanted = parse_targets(targets)
    prompts = read_prompts(prompts_file)
    text = read_text(text_file)
    resolve_model(cfg.model.source)  # a bad --model is one error here, not one per backend
    note_random(cfg.model.source)
    real = random_origin(cfg.model.source) is None
    runs = []
    for t in wanted:
        if not as_json:
            click.echo(f"running {t.label} ...", err=True)
        runs.append(run_backend(cfg.to_dict(), t.name, t.device, prompts, max_new_tokens, t.dtype, text))
    pairs = compare_all(runs, atol)
    report = to_json(runs, pairs, atol, real)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print_tables(runs, report, len(prompts), max_new_tokens)
    if sum(r.available for r in runs) < 2:
        raise click.ClickException("fewer than two backends ran, nothing to compare")
    failed = [p for p in pairs if not p["passed"]]
    if failed:
        p = failed[0]
        if p["criterion"].startswith("max"):
            raise click.ClickException(f"{p['a']} vs {p['b']}: max |logit diff| {p['max_abs_diff']:.2e} > atol {atol:g}")
        rel = (p["text"] or {}).get("rel_logit_error")
        raise click.ClickException(f"{p['a']} vs {p['b']}: beyond quantization error ({p['criterion']}; measured "
                                   f"{'n/a' if rel is None else f'{rel:.3f}'}): the quantized target is wrong, "
                                   f"not merely less precise")


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())


def _print_tables(runs, report, n_prompts, n_tokens) -> None:
    click.echo(f"{n_prompts} prompts, {n_tokens} greedy tokens each, batch 1; reference: {report['reference']}\n")
    rows = [("target", "dtype", "prefill ms", "decode ms/token", "load s", "perplexity", "status")]
    for r, row in zip(runs, report["backends"]):
        if r.available:
            ppl = row.get("perplexity")
            rows.append((r.target, r.dtype, f"{r.prefill_ms:.2f}", f"{r.decode_ms:.2f}", f"{r.load_s:.1f}",
                         "-" if ppl is None else f"{ppl:.2f}", "ok"))
        else:
            rows.append((r.target, "-", "-", "-", "-", "-", f"unavailable: {r.reason}"))
    _table(rows)
    if report["perplexity_note"]:
        click.echo(f"perplexity: {report['perplexity_note']}")
    pairs = report["pairs"]
    if not pairs:
        return
    click.echo("\ngreedy generation (steps with identical inputs, up to the first divergence):")
    rows = [("pair", "max|dlogit|", "mean|dlogit|", "top-1", "same tokens", "token agreement", "first divergence",
             "result")]
    for p in pairs:
        div = [d for d in p["first_divergence"] if d is not None]
        rows.append((f"{p['a']} vs {p['b']}", f"{p['max_abs_diff']:.2e}", f"{p['mean_abs_diff']:.2e}",
                     f"{p['top1_agreement']:.1%}", f"{p['prompts_identical']}/{p['prompts']}",
                     f"{p['token_agreement']:.1%}", f"token {min(div)}" if div else "-",
                     "pass" if p["passed"] else f"FAIL (atol {report['atol']:g})" if p["criterion"].startswith("max")
                     else f"FAIL ({p['criterion']})"))
    _table(rows)
    texts = [p for p in pairs if p["text"]]
    if texts:
        click.echo(f"\nfixed text, teacher-forced ({texts[0]['text']['positions']} positions):")
        rows = [("pair", "KL mean", "KL max", "top-1", "rel. logit error", "max|dlogit|")]
        for p in texts:
            t = p["text"]
            rows.append((f"{p['a']} vs {p['b']}", f"{t['kl_mean']:.2e}", f"{t['kl_max']:.2e}",
                         f"{t['top1_agreement']:.1%}", f"{t['rel_logit_error']:.4f}", f"{t['max_abs_diff']:.2e}"))
        _table(rows)
