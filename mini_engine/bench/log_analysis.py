"""The server's request log (`server.log_csv`, one row per request) summarized per (endpoint, mode).

A row counts as aborted when its finish_reason is abort (the client went away; status 499),
else as an error when its HTTP status is >= 400 or its finish_reason is error or timeout; latency and
throughput figures come from the other rows (answered: stop or length), memory from all.
Percentiles are numpy's linear interpolation, as in the load generator's figures.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..errors import MiniEngineError

LOG_COLUMNS = ("timestamp", "request_id", "endpoint", "mode", "prompt_tokens", "output_tokens", "queue_ms", "ttft_ms",
               "e2e_ms", "tokens_per_s", "finish_reason", "status", "rss_mib", "device_mem_mib", "backend", "device")
_INTS = ("prompt_tokens", "output_tokens")
_FLOATS = ("queue_ms", "ttft_ms", "e2e_ms", "tokens_per_s", "rss_mib", "device_mem_mib")
ERROR_REASONS = ("error", "timeout")
ALL = "(all)"

# name -> (unit, meaning); the order is summary.csv's.
SUMMARY_COLUMNS: dict[str, tuple[str, str]] = {
    "endpoint": ("", f"request path, or {ALL} for every row of the log"),
    "mode": ("", "stream or batch (or {ALL})"),
    "count": ("requests", "rows of the log"),
    "errors": ("requests", "HTTP status >= 400 or finish_reason error/timeout, aborts left out"),
    "aborted": ("requests", "finish_reason abort: the client went away (status 499)"),
    "answered": ("requests", "the rest (finish_reason stop or length): the rows the figures below describe"),
    "ttft_mean_ms": ("ms", "time to first token (server side)"),
    "ttft_p50_ms": ("ms", ""), "ttft_p95_ms": ("ms", ""), "ttft_p99_ms": ("ms", ""),
    "e2e_mean_ms": ("ms", "request arrival -> last token (server side)"),
    "e2e_p50_ms": ("ms", ""), "e2e_p95_ms": ("ms", ""), "e2e_p99_ms": ("ms", ""),
    "queue_mean_ms": ("ms", "time waiting before the first step"),
    "tokens_per_s_mean": ("tokens/s", "mean of the per-request tokens_per_s"),
    "output_tokens_mean": ("tokens", "mean output tokens per request"),
    "max_rss_mib": ("MiB", "largest resident memory of the server logged (all rows)"),
    "max_device_mem_mib": ("MiB", "largest device memory logged (empty on CPU)"),
}
PLOTS = ("latency_cdf.png", "ttft_vs_e2e.png", "tokens_per_s_over_time.png", "memory_over_time.png")
OUTPUTS = ("summary.csv", "summary.json") + PLOTS


@dataclass
class LogRow:
    time: datetime
    request_id: str
    endpoint: str
    mode: str
    prompt_tokens: int | None
    output_tokens: int | None
    queue_ms: float | None
    ttft_ms: float | None
    e2e_ms: float | None
    tokens_per_s: float | None
    finish_reason: str
    status: int
    rss_mib: float | None
    device_mem_mib: float | None
    backend: str
    device: str

    @property
    def aborted(self) -> bool:
        return self.finish_reason == "abort"  # the server logs these with status 499

    @property
    def error(self) -> bool:
        return not self.aborted and (self.status >= 400 or self.finish_reason in ERROR_REASONS)

    @property
    def answered(self) -> bool:
        return not self.error and not self.aborted

    @property
    def group(self) -> tuple[str, str]:
        return self.endpoint, self.mode


def default_out(log: Path) -> Path:
    """Beside the log: server.csv -> server_analysis/."""
    return log.parent / f"{log.stem}_analysis"


def read_log(path: str | Path) -> list[LogRow]:
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise MiniEngineError(f"{path}: empty file, expected a request log CSV with a header")
            missing = [c for c in LOG_COLUMNS if c not in header]
            if len(missing) == len(LOG_COLUMNS):
                raise MiniEngineError(f"{path}: not a request log: its header has none of the columns "
                                      f"{','.join(LOG_COLUMNS)}")
            if missing:
                raise MiniEngineError(f"{path}: not a request log: missing column{'s' if len(missing) > 1 else ''} "
                                      f"{', '.join(missing)}")
            rows = [_row(path, reader.line_num, raw) for raw in reader]
    except FileNotFoundError:
        raise MiniEngineError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MiniEngineError(f"{path}: is a directory, expected a request log CSV") from None
    except UnicodeDecodeError:
        raise MiniEngineError(f"{path}: not UTF-8 text, expected a request log CSV") from None
    except csv.Error as e:
        raise MiniEngineError(f"{path}: not a readable CSV: {e}") from None
    if not rows:
        raise MiniEngineError(f"{path}: the log has a header but no requests")
    return rows


def _row(path: Path, line: int, raw: dict[str, str | None]) -> LogRow:
    def fail(col: str, why: str):
        return MiniEngineError(f"{path}, line {line}: {col} {raw.get(col)!r}: {why}")

    if None in raw:
        raise MiniEngineError(f"{path}, line {line}: more fields than the header's {len(raw) - 1}")
    if any(raw[c] is None for c in LOG_COLUMNS):
        raise MiniEngineError(f"{path}, line {line}: fewer fields than the header's")
    values: dict[str, Any] = {c: raw[c].strip() for c in LOG_COLUMNS}
    try:
        t = datetime.fromisoformat(values["timestamp"].replace("Z", "+00:00"))
    except ValueError:
        raise fail("timestamp", "not an ISO-8601 time") from None
    values["time"] = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    del values["timestamp"]
    for col in _INTS + ("status",):
        v = values[col]
        if not v and col != "status":
            values[col] = None
            continue
        try:
            values[col] = int(v)
        except ValueError:
            raise fail(col, "not an integer") from None
    for col in _FLOATS:
        try:
            values[col] = float(values[col]) if values[col] else None
        except ValueError:
            raise fail(col, "not a number") from None
    for col in ("endpoint", "mode"):
        if not values[col]:
            raise fail(col, "empty")
    return LogRow(**values)


def summarize(rows: list[LogRow]) -> list[dict[str, Any]]:
    """One dict per (endpoint, mode), sorted, then an (all) row when there is more than one group."""
    groups: dict[tuple[str, str], list[LogRow]] = {}
    for r in rows:
        groups.setdefault(r.group, []).append(r)
    out = [_figures(endpoint, mode, groups[endpoint, mode]) for endpoint, mode in sorted(groups)]
    if len(groups) > 1:
        out.append(_figures(ALL, ALL, rows))
    return out


def _figures(endpoint: str, mode: str, rows: list[LogRow]) -> dict[str, Any]:
    import numpy as np

    ok = [r for r in rows if r.answered]

    def stats(name: str) -> dict[str, float | None]:
        v = np.array([getattr(r, name) for r in ok if getattr(r, name) is not None], dtype=float)
        prefix = name.removesuffix("_ms")
        if v.size == 0:
            return {f"{prefix}_mean_ms": None} | {f"{prefix}_p{p}_ms": None for p in (50, 95, 99)}
        p50, p95, p99 = np.percentile(v, [50, 95, 99])
        return {f"{prefix}_mean_ms": float(v.mean()), f"{prefix}_p50_ms": float(p50), f"{prefix}_p95_ms": float(p95),
                f"{prefix}_p99_ms": float(p99)}

    def mean(name: str) -> float | None:
        v = [getattr(r, name) for r in ok if getattr(r, name) is not None]
        return float(np.mean(v)) if v else None

    def peak(name: str) -> float | None:
        v = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        return max(v) if v else None

    return {"endpoint": endpoint, "mode": mode, "count": len(rows), "errors": sum(r.error for r in rows),
            "aborted": sum(r.aborted for r in rows), "answered": len(ok), **stats("ttft_ms"), **stats("e2e_ms"),
            "queue_mean_ms": mean("queue_ms"), "tokens_per_s_mean": mean("tokens_per_s"),
            "output_tokens_mean": mean("output_tokens"), "max_rss_mib": peak("rss_mib"),
            "max_device_mem_mib": peak("device_mem_mib")}


def describe_log(path: Path, rows: list[LogRow]) -> dict[str, Any]:
    times = sorted(r.time for r in rows)
    return {"log": str(path), "rows": len(rows), "first": times[0].isoformat(), "last": times[-1].isoformat(),
            "span_s": (times[-1] - times[0]).total_seconds(),
            "backends": sorted({r.backend for r in rows if r.backend}),
            "devices": sorted({r.device for r in rows if r.device}),
            "finish_reasons": _counts(r.finish_reason or "(empty)" for r in rows),
            "statuses": {str(k): v for k, v in _counts(r.status for r in rows).items()}}


def _counts(values) -> dict:
    out: dict = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return dict(sorted(out.items()))


def write_summary(summary: list[dict[str, Any]], meta: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SUMMARY_COLUMNS))
        writer.writeheader()
        for row in summary:
            writer.writerow({k: "" if v is None else round(v, 3) if isinstance(v, float) else v
                             for k, v in row.items()})
    columns = {k: {"unit": unit, "meaning": meaning} for k, (unit, meaning) in SUMMARY_COLUMNS.items()}
    (out / "summary.json").write_text(json.dumps({"columns": columns, "meta": meta, "groups": summary}, indent=2)
                                      + "\n")
    return [out / "summary.csv", out / "summary.json"]


# ----- console ------------------------------------------------------------------------
def echo_table(summary: list[dict[str, Any]], echo: Callable[[str], None]) -> None:
    head = ["endpoint", "mode", "count", "errors", "TTFT mean", "p50", "p95", "p99", "e2e mean", "p50", "p95", "p99",
            "tok/s", "max RSS MiB"]
    keys = ["ttft_mean_ms", "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "e2e_mean_ms", "e2e_p50_ms", "e2e_p95_ms",
            "e2e_p99_ms"]
    table = [head]
    for s in summary:
        errors = str(s["errors"]) + (f" (+{s['aborted']} aborted)" if s["aborted"] else "")
        table.append([s["endpoint"], s["mode"], str(s["count"]), errors, *(_f(s[k]) for k in keys),
                      _f(s["tokens_per_s_mean"], 1), _f(s["max_rss_mib"], 0)])
    widths = [max(len(r[c]) for r in table) for c in range(len(head))]
    for r in table:
        echo("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             .rstrip())
    echo("latencies in ms (server side), over answered requests (finish_reason stop or length)")


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
