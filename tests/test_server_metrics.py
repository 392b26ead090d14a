"""/metrics in Prometheus text format, read back with prometheus_client's own parser."""
from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_util import running_server, wait_idle


def scrape(url):
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def value(families, name, **labels):
    family = name
    for suffix in ("_count", "_sum", "_bucket"):
        family = family.removesuffix(suffix)
    for s in families[family].samples:
        if s.name in (name, name + "_total") and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(name)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_metrics_count_what_was_served(backend):
    with running_server("random:tiny", backend=backend) as s:
        url = s.url
        before = scrape(url)
        assert value(before, "mini_engine:num_requests_running") == 0
        shared = "a shared prefix that is long enough to fill more than one KV block of sixteen tokens " * 2
        for i in range(3):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": shared + str(i), "max_tokens": 5, "temperature": 0,
                                                        "ignore_eos": True})
            assert r.status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "short", "max_tokens": 3, "stream": True,
                                                    "ignore_eos": True})
        assert r.status_code == 200
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "x", "n": 2}).status_code == 400
        wait_idle(url)
        m = scrape(url)
        assert value(m, "mini_engine:request_success", finished_reason="length") == 4
        assert value(m, "mini_engine:generation_tokens") == 18
        prompt_tokens = value(m, "mini_engine:prompt_tokens")
        assert prompt_tokens > 3 * 30
        assert value(m, "mini_engine:request_prompt_tokens_count") == 4
        assert value(m, "mini_engine:request_prompt_tokens_sum") == prompt_tokens
        for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                  "request_prefill_time_seconds", "request_decode_time_seconds", "request_generation_tokens"):
            assert value(m, f"mini_engine:{h}_count") == 4, h
        assert value(m, "mini_engine:inter_token_latency_seconds_count") == 3 * 4 + 2
        assert value(m, "mini_engine:kv_cache_usage_perc") == 0
        assert value(m, "mini_engine:num_requests_waiting") == 0
        assert value(m, "mini_engine:engine_loop_alive") == 1
        if backend == "torch":  # the slots layout of onnxruntime keeps no prefix cache
            assert value(m, "mini_engine:prefix_cache_hits") > 0
        assert value(m, "mini_engine:prefix_cache_queries") >= value(m, "mini_engine:prefix_cache_hits")
        assert "mini_engine:num_preemptions" in m
        assert not any(n.endswith("_created") for n in m)
