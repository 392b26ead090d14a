"""`mini-engine analyze`: summarize and plot the server's request log (server.log_csv)."""
from __future__ import annotations

from pathlib import Path

import click


@click.command("analyze")
@click.argument("log", type=click.Path(dir_okay=False))
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Directory for summary.csv, summary.json and the plots [LOG's folder/<LOG name>_analysis].")
@click.option("--no-plots", is_flag=True, help="Only the table, summary.csv and summary.json (no matplotlib needed).")
def command(log, out, no_plots):
    """Per (endpoint, mode) of the request log LOG: count, errors, TTFT and e2e mean/p50/p95/p99, mean
    tokens/s, max RSS; writes summary.csv, summary.json and plots (latency CDFs streaming vs batch,
    TTFT vs e2e, tokens/s and memory over time)."""
    from ..bench.log_analysis import OUTPUTS, default_out, describe_log, echo_table, read_log, summarize, write_summary
    from ..devices import module_installed
    from ..errors import MiniEngineError

    if not no_plots and not module_installed("matplotlib"):
        raise MiniEngineError("the plots need matplotlib: pip install 'mini-engine[bench]', or pass --no-plots")
    log_path = Path(log)
    rows = read_log(log_path)
    out_dir = Path(out) if out else default_out(log_path)
    if out_dir.exists() and not out_dir.is_dir():
        raise MiniEngineError(f"--out {out_dir} is a file, not a directory")
    summary = summarize(rows)
    meta = describe_log(log_path, rows)
    echo_table(summary, click.echo)
    written = write_summary(summary, meta, out_dir)
    if not no_plots:
        from ..bench.log_plots import write_plots

        backend = ", ".join(f"{b}:{d}" for b in meta["backends"] for d in meta["devices"]) or "server"
        written += write_plots(rows, out_dir, title=f"{log_path.name}: {meta['rows']} requests, {backend}")
    for name in OUTPUTS:  # a plot of an earlier analysis beside this one's CSV would pass for it
        if out_dir / name not in written:
            (out_dir / name).unlink(missing_ok=True)
    click.echo(f"wrote {out_dir}: {', '.join(p.name for p in written)}", err=True)
