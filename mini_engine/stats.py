"""Serving metrics: counters and bounded latency summaries, named like vLLM's Prometheus metrics.

Summaries keep the most recent observations only (a fixed-size window), so a
long-running server's memory stays bounded; benchmarks that need every value
read them from the requests themselves.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np

PREFIX = "mini_engine:"
WINDOW = 10_000


class Summary:
    """count and sum of every observation; mean and percentiles over the last WINDOW."""

    def __init__(self, window: int = WINDOW):
        self.count = 0
        self.total = 0.0
        self.recent: deque[float] = deque(maxlen=window)

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.recent.append(value)

    def to_dict(self) -> dict[str, float]:
        if not self.recent:
            return {"count": 0, "sum": 0.0}
        x = np.fromiter(self.recent, dtype=np.float64)
        p50, p90, p95, p99 = np.percentile(x, [50, 90, 95, 99])
        return {"count": self.count, "sum": round(self.total, 3), "mean": round(float(x.mean()), 3),
                "p50": round(float(p50), 3), "p90": round(float(p90), 3), "p95": round(float(p95), 3),
                "p99": round(float(p99), 3), "max": round(float(x.max()), 3)}


class ServingStats:
    """Thread-safe counters, a batch-size histogram and latency summaries."""

    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {}
        self.summaries: dict[str, Summary] = {}
        self.batch_sizes: dict[int, int] = {}

    def inc(self, name: str, by: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + by

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.summaries.setdefault(name, Summary()).observe(value)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1

    def snapshot(self, **gauges: Any) -> dict[str, Any]:
        """Everything as one flat dict of `mini_engine:<name>` keys."""
        with self._lock:
            out: dict[str, Any] = {PREFIX + k: v for k, v in sorted(self.counters.items())}
            hist = dict(sorted(self.batch_sizes.items()))
            batches = sum(hist.values())
            out[PREFIX + "batch_size_histogram"] = hist
            out[PREFIX + "mean_batch_size"] = (
                round(sum(s * n for s, n in hist.items()) / batches, 3) if batches else 0.0)
            for name, summary in sorted(self.summaries.items()):
                out[PREFIX + name] = summary.to_dict()
        out.update({PREFIX + k: v for k, v in gauges.items()})
        return out
