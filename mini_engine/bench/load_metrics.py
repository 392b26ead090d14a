"""A load run's figures from its RequestRecords, named as `vllm bench serve` names them.

completed / failed requests, duration (s), request_throughput (completed req/s),
request_goodput (req/s meeting every SLO given), output_throughput and
total_token_throughput (tok/s), and for ttft, tpot, itl, e2el: mean / median / std /
p90 / p95 / p99 in ms (numpy's linear-interpolation percentiles, as vLLM's). TPOT is
per request: (e2el - ttft) / (output_tokens - 1), the first token excluded; ITL pools
the gaps between token chunks of all requests. Failed requests count in `failed` (by
kind in failed_by_kind) and in no latency figure. Figures with no sample are None.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from .load_client import RequestRecord

METRICS = {"ttft": ("TTFT", "Time to First Token"),
           "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
           "itl": ("ITL", "Inter-token Latency"),
           "e2el": ("E2EL", "End-to-end Latency")}
PERCENTILES = (90, 95, 99)
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")


def percentile_stats(values: Iterable[float], name: str) -> dict[str, float | None]:
    """mean_/median_/std_/p90_/p95_/p99_<name>_ms of `values` (ms); all None when empty."""
    import numpy as np

    v = np.asarray(list(values), dtype=float)
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"] + [f"p{p}_{name}_ms" for p in PERCENTILES]
    if v.size == 0:
        return dict.fromkeys(keys)
    figures = [v.mean(), np.median(v), v.std(), *np.percentile(v, PERCENTILES)]
    return {k: float(x) for k, x in zip(keys, figures)}


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """A completed request within every limit of `slo` (ttft_ms, tpot_ms, e2el_ms). As in vLLM, a
    request of one output token has TPOT 0 here."""
    if not record.ok:
        return False
    values = {"ttft_ms": record.ttft_ms, "tpot_ms": record.tpot_ms or 0.0, "e2el_ms": record.e2el_ms}
    return all(values[k] is not None and values[k] <= limit for k, limit in slo.items())


def summarize(records: list[RequestRecord], duration_s: float, slo: dict[str, float] | None = None) -> dict[str, Any]:
    slo = dict(slo or {})
    unknown = set(slo) - set(SLO_KEYS)
    if unknown:
        raise ValueError(f"unknown SLO keys {sorted(unknown)}; expected {', '.join(SLO_KEYS)}")
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    duration = max(duration_s, 1e-9)
    total_in = sum(r.prompt_tokens or 0 for r in done)
    total_out = sum(r.output_tokens for r in done)
    kinds: dict[str, int] = {}
    for r in failed:
        kinds[r.error_kind] = kinds.get(r.error_kind, 0) + 1
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(done),
        "failed": len(failed),
        "failed_by_kind": dict(sorted(kinds.items())),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / duration,
        "request_goodput": sum(meets_slo(r, slo) for r in done) / duration if slo else None,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "max_output_tokens_per_s": peak_output_tokens_per_s(done),
        "max_concurrent_requests": peak_concurrency(done),
        "slo": slo,
        "stream": all(r.stream for r in records) if records else None,
        "prompt_tokens_unknown": sum(r.prompt_tokens is None for r in done),
        "usage_missing": sum(not r.usage_reported for r in done),
    }
    streamed = [r for r in done if r.stream]
    out |= percentile_stats([r.ttft_ms for r in done if r.ttft_ms is not None], "ttft")
    out |= percentile_stats([r.tpot_ms for r in streamed if r.tpot_ms is not None], "tpot")
    out |= percentile_stats([g for r in streamed for g in r.itl_ms], "itl")
    out |= percentile_stats([r.e2el_ms for r in done], "e2el")
    return out


def peak_concurrency(records: list[RequestRecord]) -> int:
    """Most requests in flight at once: a sweep over [start, end) intervals, ends before starts on ties."""
    events = []
    for r in records:
        events += [(r.start_s, 1), (r.start_s + r.e2el_ms / 1e3, -1)]
    peak = now = 0
    for _, delta in sorted(events):
        now += delta
        peak = max(peak, now)
    return peak


def peak_output_tokens_per_s(records: list[RequestRecord]) -> float:
    """The most token chunks (all output tokens of a non-streamed answer) that arrived within
    one whole second of the run, counting from the first request's start."""
    if not records:
        return 0.0
    t0 = min(r.start_s for r in records)
    buckets: dict[int, int] = {}
    for r in records:
        for t in r.token_times_ms():
            b = int(r.start_s - t0 + t / 1e3)
            buckets[b] = buckets.get(b, 0) + 1
    return float(max(buckets.values(), default=0))


# ----- console ------------------------------------------------------------------------
def format_summary(summary: dict[str, Any], load: str, errors: list[str] = ()) -> list[str]:
    """The result table, laid out as `vllm bench serve` prints its own. `load` describes the
    arrival pattern (a "label: value" line, e.g. "Maximum request concurrency: 4")."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value, fmt: str = "{:<10.2f}") -> None:
        lines.append(("{:<40} ".format(label) + ("-" if value is None else fmt.format(value))).rstrip())

    row("Successful requests:", summary["completed"], "{:<10}")
    row("Failed requests:", summary["failed"], "{:<10}")
    if summary["failed_by_kind"]:
        lines.append("{:<40} {}".format("Failed requests by kind:",
                                        ", ".join(f"{k}={v}" for k, v in summary["failed_by_kind"].items())))
    label, _, value = load.partition(": ")
    lines.append("{:<40} {}".format(label + ":", value))
    row("Benchmark duration (s):", summary["duration"])
    row("Total input tokens:", summary["total_input_tokens"], "{:<10}")
    row("Total generated tokens:", summary["total_output_tokens"], "{:<10}")
    row("Request throughput (req/s):", summary["request_throughput"])
    if summary["slo"]:
        row("Request goodput (req/s):", summary["request_goodput"])
        lines.append("{:<40} {}".format("Goodput SLO:", ", ".join(f"{k} <= {v:g}" for k, v in summary["slo"].items())))
    row("Output token throughput (tok/s):", summary["output_throughput"])
    row("Peak output token throughput (tok/s):", summary["max_output_tokens_per_s"])
    row("Peak concurrent requests:", summary["max_concurrent_requests"], "{:<10}")
    row("Total Token throughput (tok/s):", summary["total_token_throughput"])
    streamed = summary["stream"] is not False
    for name, (short, header) in METRICS.items():
        if not streamed and name in ("tpot", "itl") or summary[f"mean_{name}_ms"] is None:
            continue  # no sample: no section of dashes
        lines.append("{s:{c}^{n}}".format(s=header, n=50, c="-"))
        row(f"Mean {short} (ms):", summary[f"mean_{name}_ms"])
        row(f"Median {short} (ms):", summary[f"median_{name}_ms"])
        for p in PERCENTILES:
            row(f"P{p} {short} (ms):", summary[f"p{p}_{name}_ms"])
    lines.append("=" * 50)
    if not streamed:
        lines.append("note: non-streaming (--no-stream): each answer arrives whole, so TTFT = E2EL; "
                     "TPOT and ITL are not measured")
    if summary["usage_missing"]:
        lines.append(f"note: {summary['usage_missing']} answers carried no usage: their output tokens are "
                     f"{'token chunks counted' if streamed else 'counted as 0'}")
    if summary["prompt_tokens_unknown"]:
        lines.append(f"note: {summary['prompt_tokens_unknown']} prompts of unknown length (no usage.prompt_tokens) "
                     f"count 0 input tokens")
    for e in errors:
        lines.append(f"error: {e}")
    return lines


def echo_summary(summary: dict[str, Any], load: str, echo: Callable[[str], None], errors: list[str] = ()) -> None:
    for line in format_summary(summary, load, errors):
        echo(line)
