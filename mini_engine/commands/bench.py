"""`mini-engine bench`: compare backends, devices and batch sizes through the dynamic batcher."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from ..config import DTYPES
from .common import note_random


@click.command("bench")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config file: model, dtype, batching.* (max_queue_delay_ms, ...) and backend options.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override a config key (repeatable), e.g. --set batching.max_queue_delay_ms=5.")
@click.option("--model", "-m", default=None, help="Model spec (default: the config's, random:gpt2).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None,
              help="Precision of every target (model.dtype); one target's own: BACKEND:DEVICE@DTYPE, e.g. "
                   "--targets onnxruntime:cpu@float32,onnxruntime:cpu@int8 compares both in one run.")
@click.option("--targets", "-t", default="torch:cpu,onnxruntime:cpu", show_default=True,
              help="Comma-separated backend:device[@dtype] list, e.g. torch:cpu,torch:cpu@int8,onnxruntime:cuda. "
                   "Targets that cannot run here are reported as skipped.")
@click.option("--batch-sizes", default=None,
              help="Comma-separated max_batch_size values to sweep [forward: 1,2,4,8,16; generate: 1,4,16; "
                   "naive-vs-optimized: 16].")
@click.option("--requests", "-n", type=int, default=None,
              help="Requests per trial and batch size [forward 48, generate 16, naive-vs-optimized 16].")
@click.option("--trials", type=int, default=None, help="Measured trials per point [forward 3, generate 2, "
                                                       "naive-vs-optimized 1].")
@click.option("--mode", type=click.Choice(["forward", "generate", "naive-vs-optimized", "continuous"]),
              default="forward", show_default=True,
              help="forward: score a prompt (one forward pass); generate: whole generations (continuous batching "
                   "where the backend has it); naive-vs-optimized: generate plus the no-KV-cache one-at-a-time "
                   "baseline; continuous: naive vs static vs continuous batching on a mixed-length workload "
                   "(--batch-sizes is then the static batcher's sweep [4,8,16,32]).")
@click.option("--prompt-lens", default=None, metavar="LO:HI",
              help="continuous mode: prompt lengths, uniform [16:256].")
@click.option("--output-lens", default=None, metavar="LO:HI",
              help="continuous mode: output lengths, uniform, EOS ignored [16:256].")
@click.option("--naive-requests", type=int, default=8, show_default=True,
              help="continuous mode: the naive baseline's seeded subset of the requests.")
@click.option("--max-num-seqs", type=int, default=None,
              help="continuous mode: continuous batching's max_num_seqs [the config's scheduler.max_num_seqs].")
@click.option("--prompt-len", type=int, default=8, show_default=True, help="Tokens per prompt.")
@click.option("--max-new-tokens", type=int, default=16, show_default=True, help="Tokens per generation.")
@click.option("--concurrency", type=int, default=None,
              help="Closed loop: concurrent clients [default: twice the largest batch size, which keeps it full].")
@click.option("--request-rate", type=float, default=None, help="Open loop: Poisson arrivals per second.")
@click.option("--warmup", type=int, default=None, help="Unmeasured requests per point [one full batch].")
@click.option("--top-k", type=int, default=5, show_default=True, help="Candidates returned per scored prompt.")
@click.option("--option", "options", multiple=True, metavar="BACKEND.KEY=VALUE",
              help="A backend option for one backend (repeatable), e.g. --option torch.threads=2.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prompts and arrivals.")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Directory for bench.csv, bench.json, *.png and per-target logs [default: a new "
                   "result/bench/<UTC time> per run].")
@click.option("--force", is_flag=True,
              help="Write into a non-empty --out: its earlier results (CSVs, JSON, plots, logs) are removed first.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def command(config_path, overrides, model, dtype, targets, batch_sizes, requests, trials, mode, prompt_lens,
            output_lens, naive_requests, max_num_seqs, prompt_len, max_new_tokens, concurrency, request_rate, warmup,
            top_k, options, seed, out, force, progress):
    """Measure throughput and latency per target and batch size; write a table, CSV, JSON and plots.

    Each target runs in its own process; each batch size is the dynamic batcher's
    max_batch_size while single-sample requests arrive from concurrent clients.
    """
    from ..bench import BenchSpec, run_bench
    from ..bench.report import prepare_out, print_report
    from ..bench.spec import parse_batch_sizes, parse_options, parse_range, parse_targets, resolve_config

    if requests is not None and requests < 1 or trials is not None and trials < 1:
        raise click.BadParameter("--requests and --trials must be >= 1")
    config = resolve_config(config_path, overrides, model, dtype)
    spec = BenchSpec(targets=parse_targets(targets), mode=mode, batch_sizes=parse_batch_sizes(batch_sizes),
                     requests=requests or 0, trials=trials or 0, prompt_len=prompt_len,
                     max_new_tokens=max_new_tokens, concurrency=concurrency, request_rate=request_rate,
                     warmup=warmup, top_k=top_k, seed=seed, config=config, options=parse_options(options),
                     prompt_lens=parse_range(prompt_lens, "--prompt-lens") or (16, 256),
                     output_lens=parse_range(output_lens, "--output-lens") or (16, 256),
                     naive_requests=naive_requests,
                     max_num_seqs=max_num_seqs or config["scheduler"]["max_num_seqs"])
    out_dir = prepare_out(Path(out) if out else None, force)  # before measuring: minutes are not lost to a refusal
    note_random(config["model"]["source"])
    result = run_bench(spec, out_dir, progress=progress, command=_command_line())
    print_report(result, click.echo)
    names = [str(p.relative_to(out_dir)) for p in result["written"]]
    plots = [n for n in names if n.endswith(".png")]
    files = [n for n in names if not n.endswith(".png")] + ([f"{len(plots)} plots ({', '.join(plots)})"] if plots
                                                            else ["no plots (no target was measured)"])
    if any((out_dir / "logs").glob("*.log")):
        files.append("logs/")
    click.echo(f"wrote {out_dir}: {', '.join(files)}", err=True)
    if not any(r["status"] == "ok" for r in result["results"]):
        raise click.ClickException("no target could be measured (reasons above)")


def _command_line() -> str:
    import shlex

    prog = Path(sys.argv[0]).name
    return shlex.join(["mini-engine" if prog in ("__main__.py", "mini-engine") else prog, *sys.argv[1:]])
