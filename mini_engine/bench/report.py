"""Benchmark output: console table, CSV, JSON and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

from ..errors import MiniEngineError
from .metrics import COLUMNS

PLOTS = ("throughput_vs_batch_size.png", "latency_mean_vs_batch_size.png", "latency_p50_p95_vs_batch_size.png",
         "summary.png")
OUTPUTS = ("bench.csv", "bench.json", "naive_vs_optimized.csv", "continuous_vs_static.csv", "continuous.png") + PLOTS
DEFAULT_ROOT = Path("result") / "bench"


def prepare_out(out: Path | None, force: bool = False) -> Path:
    """The directory a run writes to: `out`, or a new DEFAULT_ROOT/<UTC time> when None.

    A non-empty `out` holds someone's results: refused unless `force`, and then the files a run
    writes are removed first, so nothing of the earlier run (plots, a comparison, logs of other
    targets) can pass for part of this one.
    """
    if out is None:
        from datetime import datetime, timezone

        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = DEFAULT_ROOT / stamp
        n = 1
        while out.exists():  # two runs within a second
            n += 1
            out = DEFAULT_ROOT / f"{stamp}-{n}"
    elif out.exists() and not out.is_dir():
        raise MiniEngineError(f"--out {out} is a file, not a directory")
    elif out.is_dir() and any(out.iterdir()):
        if not force:
            raise MiniEngineError(f"--out {out} is not empty; pass --force to replace the results in it, or "
                                  f"choose another directory (without --out each run gets a new "
                                  f"{DEFAULT_ROOT}/<UTC time>)")
        for name in OUTPUTS:
            (out / name).unlink(missing_ok=True)
        if (out / "logs").is_dir():
            for log in (out / "logs").glob("*.log"):
                log.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_all(result: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    if result["meta"]["mode"] == "continuous":
        from . import continuous

        written = [write_csv(result["results"], out / "bench.csv", fields=list(continuous.COLUMNS)),
                   write_json(result, out / "bench.json", continuous.COLUMNS)]
        if result.get("comparison"):
            written.append(write_csv(result["comparison"], out / "continuous_vs_static.csv",
                                     fields=list(result["comparison"][0])))
        written += continuous.write_plots(result["results"], out)
    else:
        written = [write_csv(result["results"], out / "bench.csv"), write_json(result, out / "bench.json")]
        if result.get("comparison"):
            written.append(write_csv(result["comparison"], out / "naive_vs_optimized.csv",
                                     fields=list(result["comparison"][0])))
        written += write_plots(result["results"], out)
    # Whatever this run did not write is not this run's: a plot or a comparison left from an
    # earlier run beside the new CSV would be read as its result.
    for name in OUTPUTS:
        if out / name not in written:
            (out / name).unlink(missing_ok=True)
    return written


def write_csv(rows: list[dict[str, Any]], path: Path, fields: list[str] | None = None) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields or list(COLUMNS), extrasaction="ignore", restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path


def write_json(result: dict[str, Any], path: Path, schema: dict | None = None) -> Path:
    columns = {name: {"unit": unit, "meaning": meaning} for name, (unit, meaning) in (schema or COLUMNS).items()}
    path.write_text(json.dumps({"columns": columns} | result, indent=2, default=str) + "\n")
    return path


def comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Naive (one at a time, no KV cache) vs optimized (KV cache + dynamic batching), per target."""
    naive = {r["target"]: r for r in rows if r["mode"] == "naive" and r["status"] == "ok"}
    out = []
    for r in rows:
        if r["mode"] != "generate" or r["status"] != "ok" or r["target"] not in naive:
            continue
        n = naive[r["target"]]
        out.append({
            "target": r["target"], "prompt_len": r["prompt_len"], "batch_size": r["batch_size"],
            "mean_batch_size": r["mean_batch_size"], "max_new_tokens": r["max_new_tokens"],
            "tokens_generated": r["requests"] * r["max_new_tokens"],  # per trial; EOS is ignored
            "naive_tokens_per_s": n["tokens_per_s"], "optimized_tokens_per_s": r["tokens_per_s"],
            "speedup": round(r["tokens_per_s"] / n["tokens_per_s"], 2),
            "naive_latency_mean_ms": n["latency_mean_ms"], "optimized_latency_mean_ms": r["latency_mean_ms"],
        })
    return out


def best_vs_batch1(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target: the batch size with the highest throughput, and its gain over batch size 1."""
    out = []
    for target in dict.fromkeys(r["target"] for r in rows):
        pts = [r for r in rows if r["target"] == target and r["status"] == "ok" and r["mode"] != "naive"]
        one = next((r for r in pts if r["batch_size"] == 1), None)
        if len(pts) < 2 or one is None:
            continue
        key = "tokens_per_s" if pts[0]["mode"] == "generate" else "throughput_rps"
        best = max(pts, key=lambda r: r[key])
        out.append({"target": target, "metric": key, "best_batch_size": best["batch_size"],
                    "best": best[key], "batch_size_1": one[key], "speedup": round(best[key] / one[key], 2)})
    return out


# ----- console ------------------------------------------------------------------------
def print_report(result: dict[str, Any], echo: Callable[[str], None]) -> None:
    if result["meta"]["mode"] == "continuous":
        from . import continuous

        continuous.print_report(result, echo)
        meta = result["meta"]
        echo(f"machine memory bandwidth (numpy copy): {meta['machine_bandwidth_gbps']} GB/s; model {meta['model']}")
        return
    rows = result["results"]
    ok = [r for r in rows if r["status"] == "ok"]
    generates = any(r["mode"] != "forward" for r in ok)
    head = ["target", "mode", "bs", "req/s", "tok/s", "mean ms", "p50", "p95", "p99", "queue ms", "compute",
            "mean bs", "GB/s", "RSS MB"] + (["TTFT ms", "ITL ms"] if generates else [])
    table = [head]
    for r in ok:
        line = [r["target"], r["mode"], str(r["batch_size"]),
                f"{r['throughput_rps']:.2f}" + _pm(r.get("throughput_rps_std")), f"{r['tokens_per_s']:.1f}",
                _f(r["latency_mean_ms"]), _f(r["latency_p50_ms"]), _f(r["latency_p95_ms"]),
                _f(r["latency_p99_ms"]), _f(r["queue_ms_mean"]), _f(r["compute_ms_mean"]),
                f"{r['mean_batch_size']:.2f}",
                f"{r['bandwidth_gbps']:.1f} ({r.get('bandwidth_fraction') or 0:.0%})", f"{r['peak_rss_mb']:.0f}"]
        if generates:
            line += [_f(r.get("ttft_mean_ms")), _f(r.get("itl_mean_ms"), 1)]
        table.append(line)
    _echo_table(table, echo)
    seen = set()
    for r in rows:
        if r["status"] != "ok" and r["target"] not in seen:
            seen.add(r["target"])
            echo(f"{r['status']}: {r['target']}: {r['reason']}")
    for g in result.get("best_vs_batch1", []):
        echo(f"{g['target']}: best batch size {g['best_batch_size']}: {g['speedup']:.2f}x the {g['metric']} "
             f"of batch size 1 ({g['best']:.1f} vs {g['batch_size_1']:.1f})")
    if result.get("comparison"):
        echo("")
        echo("naive (one request at a time, no KV cache) vs optimized (KV cache + dynamic batching):")
        comp = [["target", "prompt len", "batch size", "max tokens", "tokens generated", "naive tok/s",
                 "optimized tok/s", "speedup"]]
        for c in result["comparison"]:
            comp.append([c["target"], str(c["prompt_len"]), f"{c['batch_size']} (mean {c['mean_batch_size']:.1f})",
                         str(c["max_new_tokens"]), str(c["tokens_generated"]), f"{c['naive_tokens_per_s']:.1f}",
                         f"{c['optimized_tokens_per_s']:.1f}", f"{c['speedup']:.1f}x"])
        _echo_table(comp, echo)
    meta = result["meta"]
    echo(f"machine memory bandwidth (numpy copy): {meta['machine_bandwidth_gbps']} GB/s; "
         f"model {meta['model']}; {meta['load']}")


def _pm(std) -> str:
    return "" if std is None else f"±{std:.2f}"


def _f(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _echo_table(table: list[list[str]], echo) -> None:
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    for r in table:
        echo("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths))))


# ----- plots --------------------------------------------------------------------------
def write_plots(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(rows)
    if not series:
        return []
    tokens = any(r["mode"] == "generate" for r in rows if r["status"] == "ok")
    tput = ("tokens_per_s", "throughput (generated tokens/s)") if tokens else ("throughput_rps", "throughput (requests/s)")
    panels = {
        "throughput_vs_batch_size.png": [(tput[0], "-", "")],
        "latency_mean_vs_batch_size.png": [("latency_mean_ms", "-", "")],
        "latency_p50_p95_vs_batch_size.png": [("latency_p50_ms", "-", " p50"), ("latency_p95_ms", "--", " p95")],
    }
    ylabels = {"throughput_vs_batch_size.png": tput[1], "latency_mean_vs_batch_size.png": "mean latency (ms)",
               "latency_p50_p95_vs_batch_size.png": "latency (ms): p50 solid, p95 dashed"}
    written = []
    fig_all, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax_all, (name, lines) in zip(axes, panels.items()):
        fig, ax = plt.subplots(figsize=(6.4, 4.8))
        for a in (ax, ax_all):
            _draw(a, series, lines, ylabels[name])
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    first = next(iter(series.values()))
    fig_all.suptitle(f"{first[0]['model']}, {first[0]['mode']} mode, {first[0]['load']} "
                     f"(prompt {first[0]['prompt_len']} tokens)")
    fig_all.tight_layout()
    fig_all.savefig(out / "summary.png", dpi=110)
    plt.close(fig_all)
    return written + [out / "summary.png"]


def _series(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "ok" and r["mode"] != "naive":
            series.setdefault(r["target"], []).append(r)
    return {k: sorted(v, key=lambda r: r["batch_size"]) for k, v in series.items()}


def _draw(ax, series, lines, ylabel: str) -> None:
    for i, (target, pts) in enumerate(series.items()):
        color = f"C{i}"
        xs = [p["batch_size"] for p in pts]
        for key, style, suffix in lines:
            ys = [p.get(key) for p in pts]
            err = [p.get(f"{key}_std") or 0 for p in pts]
            ax.errorbar(xs, ys, yerr=err, fmt=style, marker="o", color=color, capsize=3, label=target + suffix)
    ax.set_xscale("log", base=2)
    ticks = sorted({p["batch_size"] for pts in series.values() for p in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("max batch size")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
