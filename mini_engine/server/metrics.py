"""Prometheus metrics under vLLM's names, with the `mini_engine:` prefix.

Per-request histograms and counters are observed when a request ends (from its Completion);
the engine's gauges and counters (running / waiting, KV usage, prefix cache, preemptions)
are read from the engine at scrape time, so they can never drift from what it reports.
Each server has its own registry: two apps in one process (tests) do not collide.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..sequence import Completion

P = "mini_engine:"

_LATENCY_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
              20.0, 40.0, 80.0, 160.0)
_ITL_S = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
          0.75, 1.0, 2.5, 5.0)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class _EngineCollector:
    """Gauges and monotonic counters the engine keeps; read on every scrape."""

    def __init__(self, stats: Callable[[], dict], labels: dict[str, str]):
        self._stats, self._labels = stats, labels

    def collect(self):
        s = self._stats()
        names, values = list(self._labels), list(self._labels.values())

        def gauge(name, doc, v):
            g = GaugeMetricFamily(P + name, doc, labels=names)
            g.add_metric(values, v)
            return g

        def counter(name, doc, v):
            c = CounterMetricFamily(P + name, doc, labels=names)
            c.add_metric(values, v)
            return c

        yield gauge("num_requests_running", "Requests in the running batch.", s.get("running", 0))
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.get("waiting", 0))
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", s.get("kv_usage", 0.0))
        yield counter("prefix_cache_queries", "Prompt blocks looked up in the prefix cache.",
                      s.get("prefix_cache_queries", 0))
        yield counter("prefix_cache_hits", "Prompt blocks served by the prefix cache.", s.get("prefix_cache_hits", 0))
        yield counter("num_preemptions", "Requests preempted (KV freed, recomputed later).", s.get("preemptions", 0))
        yield gauge("engine_loop_alive", "1 while the engine loop runs.", 1.0 if s.get("alive", True) else 0.0)


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict], model_name: str):
        self.registry = CollectorRegistry()
        labels = {"model_name": model_name}
        self._labels = labels
        self.registry.register(_EngineCollector(stats, labels))
        names = list(labels)
        r = self.registry

        def hist(name, doc, buckets):
            return Histogram(P + name, doc, names, buckets=buckets, registry=r).labels(**labels)

        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens processed.", names, registry=r).labels(**labels)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated.", names,
                                         registry=r).labels(**labels)
        self._success = Counter(P + "request_success", "Requests finished, by finish reason.",
                                names + ["finished_reason"], registry=r)
        self._errors = Counter(P + "request_errors", "Requests answered with an error, by HTTP status.",
                               names + ["status"], registry=r)
        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", _LATENCY_S)
        self.itl = hist("inter_token_latency_seconds", "Time between consecutive output tokens.", _ITL_S)
        self.tpot = hist("request_time_per_output_token_seconds", "Mean time per output token after the first, "
                         "per request.", _ITL_S)
        self.e2e = hist("e2e_request_latency_seconds", "Arrival to last token.", _LATENCY_S)
        self.queue = hist("request_queue_time_seconds", "Arrival to first scheduled.", _LATENCY_S)
        self.prefill = hist("request_prefill_time_seconds", "First scheduled to first token.", _LATENCY_S)
        self.decode = hist("request_decode_time_seconds", "First token to last token.", _LATENCY_S)
        self.prompt_len = hist("request_prompt_tokens", "Prompt length per request.", _TOKENS)
        self.generation_len = hist("request_generation_tokens", "Generated tokens per request.", _TOKENS)

    def observe(self, c: Completion) -> None:
        """A request that ended normally (stop or length)."""
        self._success.labels(**self._labels, finished_reason=c.finish_reason).inc()
        n = len(c.token_ids)
        self.prompt_tokens.inc(len(c.prompt_token_ids))
        self.generation_tokens.inc(n)
        self.prompt_len.observe(len(c.prompt_token_ids))
        self.generation_len.observe(n)
        self.ttft.observe(c.ttft_ms / 1e3)
        self.e2e.observe(c.total_ms / 1e3)
        self.queue.observe(c.queue_ms / 1e3)
        self.prefill.observe(max(c.ttft_ms - c.queue_ms, 0.0) / 1e3)
        self.decode.observe(max(c.total_ms - c.ttft_ms, 0.0) / 1e3)
        if n > 1:
            self.tpot.observe(c.tpot_ms / 1e3)
        t = c.token_times_ms
        for a, b in zip(t, t[1:]):
            self.itl.observe((b - a) / 1e3)

    def error(self, status: int) -> None:
        self._errors.labels(**self._labels, status=str(status)).inc()
