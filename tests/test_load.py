"""`mini-engine load`: the metrics math on hand-built records, prompts, bad input as one error line, the
client's protocol handling (httpx's MockTransport), and whole runs against the real server on 127.0.0.1."""
import asyncio
import csv
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from conftest import run_cli

from mini_engine.bench.load_client import RequestRecord, check_url
from mini_engine.bench.load_metrics import format_summary, meets_slo, peak_concurrency, percentile_stats, summarize
from mini_engine.bench.load_prompts import dataset_prompts, read_dataset, synthetic_prompts
from mini_engine.bench.load_run import CSV_FIELDS, LoadConfig, run_load
from mini_engine.cli import cli
from mini_engine.errors import ConfigError, MiniEngineError


def rec(i, ttft, e2el, tokens, itl=(), start=0.0, stream=True, error_kind="", prompt=10):
    return RequestRecord(index=i, start_s=start, status=200 if not error_kind else 500, prompt_tokens=prompt,
                         output_tokens=tokens, ttft_ms=ttft, itl_ms=list(itl), e2el_ms=e2el, usage_reported=True,
                         stream=stream, error_kind=error_kind, error="boom" if error_kind else "")


# ----- metrics math ---------------------------------------------------------------------
def test_percentiles_are_numpys_linear_interpolation():
    s = percentile_stats([10.0, 20.0, 30.0, 40.0], "ttft")
    assert s["mean_ttft_ms"] == 25.0 and s["median_ttft_ms"] == 25.0
    assert s["p90_ttft_ms"] == pytest.approx(37.0) and s["p95_ttft_ms"] == pytest.approx(38.5)
    assert s["p99_ttft_ms"] == pytest.approx(39.7) and s["std_ttft_ms"] == pytest.approx(math.sqrt(125))
    assert set(percentile_stats([], "itl").values()) == {None}


def test_tpot_excludes_the_first_token():
    assert rec(0, ttft=100.0, e2el=400.0, tokens=4).tpot_ms == pytest.approx(100.0)  # 300 ms over 3 tokens
    assert rec(0, ttft=100.0, e2el=100.0, tokens=1).tpot_ms is None  # one token: no time per output token
    assert rec(0, ttft=400.0, e2el=400.0, tokens=4, stream=False).tpot_ms is None  # non-streaming: not measured
    assert rec(0, ttft=100.0, e2el=400.0, tokens=4, error_kind="http_500").tpot_ms is None


def test_summary_counts_only_completed_requests_and_pools_itl():
    records = [rec(0, 100.0, 400.0, 4, itl=[100, 100, 100], start=0.0),
               rec(1, 200.0, 300.0, 3, itl=[40, 60], start=0.2),
               rec(2, 300.0, 300.0, 1, start=1.0),
               rec(3, None, 50.0, 0, error_kind="http_503", start=1.5),
               rec(4, None, 120_000.0, 0, error_kind="timeout", start=1.5)]
    s = summarize(records, duration_s=2.0)
    assert (s["completed"], s["failed"]) == (3, 2)
    assert s["failed_by_kind"] == {"http_503": 1, "timeout": 1}
    assert s["total_input_tokens"] == 30 and s["total_output_tokens"] == 8
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(4.0) and s["total_token_throughput"] == pytest.approx(19.0)
    assert s["request_goodput"] is None  # no SLO given
    assert s["mean_ttft_ms"] == pytest.approx(200.0) and s["median_e2el_ms"] == pytest.approx(300.0)
    # TPOT per request: (400-100)/3 = 100, (300-200)/2 = 50; the one-token request has none
    assert s["mean_tpot_ms"] == pytest.approx(75.0)
    assert s["mean_itl_ms"] == pytest.approx(80.0) and s["median_itl_ms"] == pytest.approx(100.0)
    assert s["max_concurrent_requests"] == 2  # [0, 0.4) and [0.2, 0.5) overlap; [1.0, 1.3) is alone
    lines = format_summary(s, "Maximum request concurrency: 2")
    assert "Successful requests:                     3" in lines
    assert "Failed requests by kind:                 http_503=1, timeout=1" in lines
    assert any(line.startswith("Mean TPOT (ms):") and line.endswith("75.00") for line in lines)


def test_goodput_counts_requests_meeting_every_slo():
    records = [rec(0, 100.0, 400.0, 4), rec(1, 200.0, 300.0, 3), rec(2, 300.0, 300.0, 1),
               rec(3, 50.0, 60.0, 2, error_kind="http_500")]
    slo = {"ttft_ms": 250.0, "tpot_ms": 60.0}
    # 0: TPOT 100 > 60; 1: TTFT 200, TPOT 50: good; 2: TTFT 300 > 250; 3 failed
    assert [meets_slo(r, slo) for r in records] == [False, True, False, False]
    assert meets_slo(records[2], {"tpot_ms": 1.0})  # one output token: TPOT counts as 0 (as vLLM)
    s = summarize(records, duration_s=4.0, slo=slo)
    assert s["request_goodput"] == pytest.approx(0.25) and s["slo"] == slo
    assert summarize(records, 4.0, {"e2el_ms": 350.0})["request_goodput"] == pytest.approx(0.5)


def test_peak_concurrency_treats_intervals_as_half_open():
    assert peak_concurrency([rec(0, 1.0, 1000.0, 1, start=0.0), rec(1, 1.0, 1000.0, 1, start=1.0)]) == 1
    assert peak_concurrency([rec(i, 1.0, 1000.0, 1, start=0.1 * i) for i in range(5)]) == 5


# ----- prompts --------------------------------------------------------------------------
def test_synthetic_prompts_are_exact_length_seeded_and_distinct():
    from mini_engine.tokenizer import gpt2_tokenizer

    tok = gpt2_tokenizer()
    prompts = synthetic_prompts(6, 24, seed=3)
    assert all(len(tok.encode(p.prompt)) == 24 and p.tokens == 24 for p in prompts)
    assert len({p.prompt for p in prompts}) == 6
    assert [p.prompt for p in synthetic_prompts(6, 24, seed=3)] == [p.prompt for p in prompts]
    assert synthetic_prompts(1, 24, seed=4)[0].prompt != prompts[0].prompt
    ids = synthetic_prompts(4, 50, seed=0, prompt_type="ids")
    assert all(len(p.prompt) == 50 and max(p.prompt) < 50000 for p in ids)
    assert len({tuple(p.prompt) for p in ids}) == 4


def test_dataset_jsonl_and_text(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"prompt": "Hello", "max_tokens": 4}\n\n{"prompt": [15496, 995]}\n')
    entries = read_dataset(jsonl)
    assert [(e.prompt, e.max_tokens, e.tokens) for e in entries] == [("Hello", 4, None), ([15496, 995], None, 2)]
    assert [p.prompt for p in dataset_prompts(jsonl, 3)] == ["Hello", [15496, 995], "Hello"]  # cycles
    text = tmp_path / "d.txt"
    text.write_text("one prompt\n\nanother one\n")
    assert [e.prompt for e in read_dataset(text)] == ["one prompt", "another one"]
    for content, message in [("", "no prompts"), ('{"text": "x"}\n', 'expected an object with "prompt"'),
                             ('{"prompt": "x"}\n{"prompt": \n', "line 2: not JSON"),
                             ('{"prompt": "x", "max_tokens": 0}\n', '"max_tokens" must be an integer >= 1'),
                             ('{"prompt": []}\n', "non-empty string or a list of token ids")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(content)
        with pytest.raises(ConfigError, match=message):
            read_dataset(bad)


# ----- bad input: one error line --------------------------------------------------------
def test_only_loopback_hosts_unless_allowed():
    for url in ("http://127.0.0.1:8000", "http://localhost:8000/", "http://[::1]:8000", "http://127.0.0.2:1"):
        assert check_url(url) == url.rstrip("/")
    for url in ("http://10.0.0.1:8000", "http://example.com", "https://8.8.8.8"):
        with pytest.raises(ConfigError, match="not loopback"):
            check_url(url)
    assert check_url("http://10.0.0.1:8000", allow_remote=True) == "http://10.0.0.1:8000"
    with pytest.raises(ConfigError, match="expected http://HOST:PORT"):
        check_url("127.0.0.1:8000")


LOCAL = ["--url", "http://127.0.0.1:9", "-n", "2"]
CLOSED = LOCAL + ["--concurrency", "1"]


@pytest.mark.parametrize("args, message", [
    (["--url", "http://10.1.2.3:8000", "-n", "2", "--concurrency", "1"], "is not loopback"),
    (["--url", "http://example.com", "-n", "2", "--request-rate", "1"], "is not loopback"),
    (CLOSED + ["--request-rate", "3"], "exactly one of --concurrency"),
    (LOCAL, "exactly one of --concurrency"),
    (LOCAL + ["--mode", "concurrent"], "needs --delay-ms"),
    (LOCAL + ["--mode", "concurrent", "--delay-ms", "5", "--concurrency", "2"], "takes no --concurrency"),
    (CLOSED + ["--delay-ms", "5"], "belongs to --mode concurrent"),
    (LOCAL + ["--request-rate", "0"], "--request-rate 0.0: must be > 0"),
    (LOCAL + ["--request-rate", "nan"], "--request-rate"),
    (["--url", "http://127.0.0.1:9", "-n", "0", "--concurrency", "1"], "--num-requests"),
    (CLOSED + ["--prompt-len", "4", "--dataset", "x.jsonl"], "--prompt-len and --dataset are alternatives"),
    (CLOSED + ["--dataset", "/no/such/file.jsonl"], "no such file"),
    (CLOSED + ["--slo", "ttft=5"], "expected KEY=MS"),
    (CLOSED + ["--slo", "ttft_ms=-1"], "positive number of ms"),
    (CLOSED + ["--no-stream", "--slo", "tpot_ms=5"], "needs streaming"),
    (CLOSED + ["--endpoint", "v1/completions"], "starting with /"),
    (["--url", "http://127.0.0.1:99999", "-n", "2", "--concurrency", "1"], "Port out of range"),
    (["--url", "http://127.0.0.1:1", "-n", "2", "--concurrency", "1"], "cannot reach http://127.0.0.1:1/v1/models"),
])
def test_bad_input_is_one_error_line(args, message):
    result = CliRunner().invoke(cli, ["load", *args])
    assert result.exit_code != 0 and (result.exception is None or isinstance(result.exception, SystemExit))
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_out_with_an_earlier_run_is_refused_before_anything_is_sent(tmp_path):
    (tmp_path / "load.json").write_text("{}")
    proc = run_cli("load", "--url", "http://127.0.0.1:1", "-n", 1, "--concurrency", 1, "--out", tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"Error: --out {tmp_path} already holds load.json")


# ----- the client's protocol handling, over httpx's MockTransport -----------------------
def mock(completion, models=None):
    async def handler(request: httpx.Request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=models or {"object": "list", "data": [{"id": "m", "object": "model"}]})
        return await completion(json.loads(request.content))
    return httpx.MockTransport(handler)


def sse(*events):
    return httpx.Response(200, headers={"content-type": "text/event-stream"},
                          content="".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events))


def chunk(text, finish=None):
    return {"id": "c", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}], "usage": None}


def usage(prompt, completion):
    return {"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}


def config(**kw):
    return LoadConfig(**({"url": "http://127.0.0.1:9", "num_requests": 2, "concurrency": 1, "max_tokens": 4} | kw))


def test_stream_parsing_usage_and_requests_sent():
    bodies = []

    async def completion(body):
        bodies.append(body)
        # an empty-text chunk is no token; the usage chunk's count wins over the 3 text chunks
        return sse(chunk("a"), chunk(""), chunk("b"), chunk("c", "length"), usage(7, 4), "[DONE]")

    result = run_load(config(ignore_eos=True, prompt_len=5, seed=1), transport=mock(completion))
    assert result.model == "m" and result.models["data"][0]["id"] == "m"
    r = result.records[0]
    assert r.ok and r.status == 200 and r.output_tokens == 4 and r.prompt_tokens == 7 and r.finish_reason == "length"
    assert len(r.itl_ms) == 2 and 0 < r.ttft_ms <= r.e2el_ms and r.text_chars == 3
    body = bodies[0]
    assert body["model"] == "m" and body["max_tokens"] == 4 and body["stream"] is True and body["ignore_eos"] is True
    assert body["stream_options"] == {"include_usage": True} and body["temperature"] == 0.0
    assert isinstance(body["prompt"], str) and body["prompt"] != bodies[1]["prompt"]


def test_without_usage_the_token_chunks_are_counted():
    async def completion(body):
        return sse(chunk("a"), chunk("b"), chunk("c", "stop"), "[DONE]")

    result = run_load(config(), transport=mock(completion))
    assert all(r.ok and r.output_tokens == 3 and r.prompt_tokens == 32 and not r.usage_reported
               for r in result.records)
    assert result.summary["usage_missing"] == 2


@pytest.mark.parametrize("answer, kind, message", [
    (lambda: httpx.Response(503, json={"error": {"message": "overloaded", "type": "x"}}), "http_503",
     "HTTP 503: overloaded"),
    (lambda: sse(chunk("a"), {"error": {"message": "engine died", "code": "engine_error"}}, "[DONE]"),
     "stream_error", "engine died"),
    (lambda: sse(chunk("a"), chunk("b")), "protocol", "ended before data: [DONE]"),
    (lambda: sse("{not json"), "bad_response", "not a JSON event"),
])
def test_failed_requests_are_counted_by_kind(answer, kind, message):
    async def completion(body):
        return answer()

    result = run_load(config(), transport=mock(completion))
    assert result.summary["completed"] == 0 and result.summary["failed_by_kind"] == {kind: 2}
    assert message in result.records[0].error


def test_non_streaming_ttft_is_e2el():
    async def completion(body):
        assert body["stream"] is False and "stream_options" not in body
        await asyncio.sleep(0.01)
        return httpx.Response(200, json={"id": "c", "object": "text_completion", "model": "m",
                                         "choices": [{"index": 0, "text": "abcd", "finish_reason": "length"}],
                                         "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})

    result = run_load(config(stream=False), transport=mock(completion))
    r = result.records[0]
    assert r.ok and r.ttft_ms == r.e2el_ms >= 10 and r.output_tokens == 4 and r.tpot_ms is None
    assert result.summary["mean_tpot_ms"] is None and result.summary["mean_itl_ms"] is None
    assert any("TTFT = E2EL" in line for line in format_summary(result.summary, result.config.describe_load()))


def test_per_request_timeout_and_run_deadline_always_end_the_run():
    async def slow(body):
        await asyncio.sleep(30)

    t = time.perf_counter()
    result = run_load(config(num_requests=3, concurrency=3, timeout_s=0.2), transport=mock(slow))
    assert result.summary["failed_by_kind"] == {"timeout": 3} and time.perf_counter() - t < 5
    t = time.perf_counter()
    result = run_load(config(num_requests=4, concurrency=1, deadline_s=0.3), transport=mock(slow))
    assert time.perf_counter() - t < 5 and len(result.records) == 4
    assert result.summary["failed_by_kind"] == {"deadline": 4}
    assert result.records[0].start_s is not None and result.records[1].start_s is None  # never sent
    assert "--deadline-s" in result.notes[0]


def test_arrivals_open_loop_and_staggered():
    async def fast(body):
        return sse(chunk("a", "length"), usage(1, 1), "[DONE]")

    staggered = run_load(config(num_requests=4, concurrency=None, mode="concurrent", delay_ms=50.0),
                         transport=mock(fast))
    starts = [r.start_s for r in staggered.records]
    assert all(abs(s - 0.05 * i) < 0.04 for i, s in enumerate(starts)), starts
    poisson = [r.start_s for r in run_load(config(num_requests=5, concurrency=None, request_rate=20.0, seed=7),
                                           transport=mock(fast)).records]
    again = [r.start_s for r in run_load(config(num_requests=5, concurrency=None, request_rate=20.0, seed=7),
                                         transport=mock(fast)).records]
    assert poisson[0] < 0.02 and poisson == sorted(poisson)
    assert all(abs(a - b) < 0.04 for a, b in zip(poisson, again))  # seeded: the same schedule
    burst = run_load(config(num_requests=4, concurrency=None, request_rate=math.inf), transport=mock(fast))
    assert all(r.start_s < 0.05 for r in burst.records)


def test_model_from_models_or_flag():
    async def fast(body):
        return sse(chunk("a", "length"), usage(1, 1), "[DONE]")

    with pytest.raises(MiniEngineError, match="lists no model"):
        run_load(config(), transport=mock(fast, models={"object": "list", "data": []}))
    assert run_load(config(model="mine"), transport=mock(fast, models={"data": []})).model == "mine"


# ----- against the real server -----------------------------------------------------------
SERVER_MISSING = importlib.util.find_spec("mini_engine.commands.serve") is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mini-engine serve --model random:tiny` on 127.0.0.1 (a subprocess), with its request log."""
    tmp = tmp_path_factory.mktemp("server")
    log_csv, out = tmp / "requests_log.csv", (tmp / "server.out").open("w")
    script = Path(sys.executable).parent / "mini-engine"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mini_engine"]
    port = _free_port()
    proc = subprocess.Popen(cmd + ["serve", "--model", "random:tiny", "--host", "127.0.0.1", "--port", str(port),
                                   "--log-csv", str(log_csv)], stdout=out, stderr=subprocess.STDOUT,
                            env={k: v for k, v in os.environ.items() if k != "MINI_ENGINE_API_KEY"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited ({proc.returncode}):\n{(tmp / 'server.out').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no 200 from {url}/health in 120 s:\n{(tmp / 'server.out').read_text()[-3000:]}")
            time.sleep(0.25)
        yield url, log_csv
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        out.close()


@pytest.mark.skipif(SERVER_MISSING, reason="the server command (mini_engine/commands/serve.py) is not there yet")
def test_cli_against_the_real_server_writes_load_json_and_requests_csv(server, tmp_path):
    url, _ = server
    proc = run_cli("load", "--url", url, "-n", 6, "--concurrency", 3, "--prompt-len", 12, "--max-tokens", 5,
                   "--ignore-eos", "--slo", "ttft_ms=60000,e2el_ms=60000", "--out", tmp_path, check=True, timeout=180)
    assert "Serving Benchmark Result" in proc.stdout and "Request goodput (req/s):" in proc.stdout
    assert "Successful requests:                     6" in proc.stdout
    result = json.loads((tmp_path / "load.json").read_text())
    s = result["summary"]
    assert (s["completed"], s["failed"]) == (6, 0)
    assert s["total_output_tokens"] == 30 and s["total_input_tokens"] == 72  # usage from the server
    assert s["request_goodput"] == pytest.approx(s["request_throughput"])
    for key in ("mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_itl_ms", "p95_e2el_ms",
                "output_throughput", "total_token_throughput", "duration"):
        assert s[key] > 0, key
    assert result["parameters"]["model"] == "random:tiny" and result["parameters"]["concurrency"] == 3
    assert result["server"]["models"]["data"][0]["id"] == "random:tiny"
    with (tmp_path / "requests.csv").open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == CSV_FIELDS and [int(r["index"]) for r in rows] == list(range(6))
    for r in rows:
        assert r["status"] == "200" and r["output_tokens"] == "5" and r["prompt_tokens"] == "12" and not r["error"]
        assert 0 < float(r["ttft_ms"]) <= float(r["e2el_ms"]) and float(r["tpot_ms"]) >= 0


@pytest.mark.skipif(SERVER_MISSING, reason="the server command (mini_engine/commands/serve.py) is not there yet")
def test_api_against_the_real_server_then_analyze_its_log(server, tmp_path):
    url, log_csv = server
    logged_before = _rows(log_csv)
    batch = run_load(LoadConfig(url=url, num_requests=4, request_rate=math.inf, stream=False, max_tokens=4,
                                ignore_eos=True, prompt_type="ids", prompt_len=9))
    assert batch.summary["completed"] == 4 and batch.summary["total_output_tokens"] == 16
    assert all(r.ttft_ms == r.e2el_ms and r.prompt_tokens == 9 for r in batch.records)
    staggered = run_load(LoadConfig(url=url, num_requests=3, mode="concurrent", delay_ms=30, max_tokens=3,
                                    ignore_eos=True, prompt_len=6))
    assert staggered.summary["completed"] == 3 and staggered.summary["total_output_tokens"] == 9
    assert [r.start_s for r in staggered.records] == sorted(r.start_s for r in staggered.records)
    bad = run_load(LoadConfig(url=url, num_requests=2, concurrency=2, model="not-served", max_tokens=2))
    assert bad.summary["failed_by_kind"] == {"http_404": 2}

    deadline = time.monotonic() + 20  # the server's log writer is a thread: wait for the rows
    while _rows(log_csv) < logged_before + 7 and time.monotonic() < deadline:
        time.sleep(0.1)
    out = tmp_path / "analysis"
    proc = run_cli("analyze", log_csv, "--out", out, check=True, timeout=120)
    groups = {(g["endpoint"], g["mode"]): g for g in json.loads((out / "summary.json").read_text())["groups"]}
    assert groups["/v1/completions", "batch"]["answered"] >= 4
    assert groups["/v1/completions", "stream"]["answered"] >= 3
    assert "/v1/completions" in proc.stdout
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in
               ("latency_cdf.png", "ttft_vs_e2e.png", "tokens_per_s_over_time.png", "memory_over_time.png"))


def _rows(log_csv: Path) -> int:
    return max(0, sum(1 for _ in log_csv.open()) - 1) if log_csv.exists() else 0
