"""`mini-engine load`: drive any OpenAI-compatible server with a bounded load and measure it as vLLM's bench does."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import click


def _parse_slo(values: tuple[str, ...]) -> dict[str, float]:
    from ..bench.load_metrics import SLO_KEYS

    slo: dict[str, float] = {}
    for value in values:
        for item in filter(None, (s.strip() for s in value.split(","))):
            key, sep, limit = item.partition("=")
            key = key.strip()
            if not sep or key not in SLO_KEYS:
                raise click.BadParameter(f"{item!r}: expected KEY=MS with KEY one of {', '.join(SLO_KEYS)}",
                                         param_hint="--slo")
            try:
                ms = float(limit)
            except ValueError:
                raise click.BadParameter(f"{item!r}: {limit!r} is not a number of ms", param_hint="--slo") from None
            if not ms > 0 or math.isinf(ms):
                raise click.BadParameter(f"{item!r}: the limit must be a positive number of ms", param_hint="--slo")
            slo[key] = ms
    return slo


@click.command("load")
@click.option("--url", required=True, help="The server root, e.g. http://127.0.0.1:8000 (loopback only unless "
                                           "--allow-remote).")
@click.option("--allow-remote", is_flag=True, help="Allow a host that is not 127.0.0.1, ::1 or localhost.")
@click.option("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY'.")
@click.option("--model", default=None, help="Model name for the requests [the first id of GET /v1/models].")
@click.option("--endpoint", default="/v1/completions", show_default=True, help="The Completions API's path.")
@click.option("--num-requests", "-n", type=click.IntRange(min=1), required=True,
              help="Requests to send: exactly this many, then the run ends.")
@click.option("--mode", type=click.Choice(["benchmark", "concurrent"]), default="benchmark", show_default=True,
              help="benchmark: closed loop (--concurrency) or open loop (--request-rate); concurrent: a new "
                   "request every --delay-ms whatever the others do.")
@click.option("--concurrency", type=click.IntRange(min=1), default=None,
              help="benchmark mode, closed loop: requests in flight (each worker sends its next when answered).")
@click.option("--request-rate", type=float, default=None,
              help="benchmark mode, open loop: Poisson arrivals per second, seeded by --seed; inf = all at once.")
@click.option("--delay-ms", type=float, default=None, help="concurrent mode: ms between request starts.")
@click.option("--stream/--no-stream", default=True, show_default=True,
              help="Stream tokens (SSE; TTFT, TPOT, ITL measured) or take whole answers (TTFT = E2EL).")
@click.option("--prompt-len", type=click.IntRange(min=1), default=None,
              help="Synthetic prompts of this many tokens, seeded, different per request [32].")
@click.option("--prompt-type", type=click.Choice(["text", "ids"]), default="text", show_default=True,
              help="Synthetic prompts as text of one-token words (exact for GPT-2 tokenizers) or as token-id "
                   "lists (prompt: [ids], ids < 50000).")
@click.option("--dataset", type=click.Path(dir_okay=False), default=None,
              help='JSONL of {"prompt": ..., "max_tokens": ... (optional)} or text with one prompt per line; '
                   "requests cycle through it.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="max_tokens of each request (a dataset entry's own wins).")
@click.option("--ignore-eos", is_flag=True, help="Ask the server to generate past <|endoftext|> (vLLM's ignore_eos).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prompts and the arrivals.")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Per request: no complete answer by then and it fails as 'timeout'.")
@click.option("--deadline-s", type=click.FloatRange(min=0, min_open=True), default=1800.0, show_default=True,
              help="The whole run: what is unanswered by then fails as 'deadline'.")
@click.option("--slo", multiple=True, metavar="KEY=MS",
              help="Goodput limit (repeatable or comma-separated): ttft_ms=..., tpot_ms=..., e2el_ms=...")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Directory for load.json (summary, parameters, /v1/models) and requests.csv (one row per request).")
@click.option("--force", is_flag=True, help="Replace load.json and requests.csv already in --out.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def command(url, allow_remote, api_key, model, endpoint, num_requests, mode, concurrency, request_rate, delay_ms,
            stream, prompt_len, prompt_type, dataset, max_tokens, ignore_eos, temperature, seed, timeout_s,
            deadline_s, slo, out, force, quiet):
    """Send a bounded load to an OpenAI-compatible server's Completions API and report throughput and
    latency (TTFT, TPOT, ITL, E2EL, goodput) as `vllm bench serve` names them."""
    from ..bench.load_run import LoadConfig, check_out, run_load
    from ..bench.load_metrics import echo_summary

    if request_rate is not None and math.isnan(request_rate):
        raise click.BadParameter("must be a number of requests per second or inf", param_hint="--request-rate")
    config = LoadConfig(url=url, num_requests=num_requests, concurrency=concurrency, request_rate=request_rate,
                        mode=mode, delay_ms=delay_ms, model=model, api_key=api_key, stream=stream,
                        prompt_len=prompt_len, prompt_type=prompt_type, dataset=dataset, max_tokens=max_tokens,
                        ignore_eos=ignore_eos, temperature=temperature, seed=seed, endpoint=endpoint,
                        timeout_s=timeout_s, deadline_s=deadline_s, slo=_parse_slo(slo), allow_remote=allow_remote,
                        progress=not quiet)
    config.validate()  # before anything is sent
    out_dir = Path(out) if out else None
    if out_dir is not None:
        check_out(out_dir, force)
    result = run_load(config)
    result.command = _command_line()
    echo_summary(result.summary, config.describe_load(), click.echo, result.errors())
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    if out_dir is not None:
        written = result.write(out_dir)
        click.echo(f"wrote {out_dir}: {', '.join(p.name for p in written)}", err=True)
    if result.summary["completed"] == 0:
        raise click.ClickException("no request succeeded (the errors above say why)")


def _command_line() -> str:
    import shlex

    args = list(sys.argv[1:])
    for i, a in enumerate(args):  # keep the key out of load.json
        if a == "--api-key" and i + 1 < len(args):
            args[i + 1] = "***"
        elif a.startswith("--api-key="):
            args[i] = "--api-key=***"
    return shlex.join(["mini-engine", *args])
