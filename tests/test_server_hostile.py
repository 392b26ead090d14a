"""Requests a hostile or careless client sends: each gets its own answer, and the server keeps
serving everyone else. A real uvicorn server on 127.0.0.1, real HTTP clients, real sockets."""
from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from server_util import running_server, wait_idle

# The fault-injection plugin: a torch runner installed as a third-party backend (an entry point
# in a .dist-info, as pip lays one out) that fails the rows of requests whose prompt holds a
# marker token: RAISE makes its step raise, NAN gives its row NaN logits (its sampling fails).
RAISE, NAN = 31337, 31338
POISON_RUNNER = f'''
import numpy as np
from mini_engine_backends.pytorch import TorchRunner


class PoisonRunner(TorchRunner):
    name = "poison"

    def _execute_paged_impl(self, step):
        rows = [step.input_ids[a:b] for a, b in zip(step.query_start[:-1], step.query_start[1:])]
        if any({RAISE} in r for r in rows):
            raise RuntimeError("poisoned row: internal detail")
        logits = super()._execute_paged_impl(step)
        for i, r in enumerate(step.logits_rows):
            if {NAN} in rows[r]:
                logits[i] = np.nan
        return logits


from mini_engine_backends.onnxruntime import OrtRunner


class PoisonOrtRunner(OrtRunner):
    name = "poisonort"

    def _execute_paged_impl(self, step):
        if {RAISE} in step.input_ids:
            raise RuntimeError("poisoned row")
        return super()._execute_paged_impl(step)
'''


@pytest.fixture(scope="module")
def poison_backend(tmp_path_factory):
    root = tmp_path_factory.mktemp("poison-plugin")
    (root / "poison_backend.py").write_text(POISON_RUNNER)
    info = root / "poison_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: poison-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mini_engine.backends]\npoison = poison_backend:PoisonRunner\n"
                                           "poisonort = poison_backend:PoisonOrtRunner\n")
    sys.path.insert(0, str(root))
    yield "poison"
    sys.path.remove(str(root))


@pytest.fixture(scope="module")
def server(hf_dir, tmp_path_factory, poison_backend):
    log = tmp_path_factory.mktemp("hostile") / "requests.csv"
    with running_server(str(hf_dir), backend=poison_backend,
                        overrides={"scheduler.max_num_seqs": 16, "server.log_csv": str(log),
                                   "server.max_prompts_per_request": 8,
                                   "server.max_tokens_per_request": 600,
                                   "server.max_logprobs_per_request": 16}) as s:
        s.log_path = log
        yield s


def errors(s, status: int) -> float:
    return s.state.metrics._errors.labels(model_name=s.model_name, status=str(status))._value.get()


def still_serving(url: str) -> None:
    assert httpx.get(f"{url}/health").status_code == 200
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "still here", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def greedy(url: str, prompt, n: int = 8) -> list[int]:
    r = httpx.post(f"{url}/generate", json={"prompt": prompt, "max_new_tokens": n, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["token_ids"]


HOSTILE = [
    # (body, status, param): the answer each gets; the server serves a normal request right after.
    ({"prompt": "hi", "temperature": 1.0, "seed": -1}, 200, None),
    ({"prompt": "hi", "temperature": 1.0, "seed": 2**63}, 400, "seed"),
    ({"prompt": ["a", "b"], "temperature": 1.0, "seed": 2**63 - 1, "max_tokens": 2}, 200, None),
    ({"prompt": "hi", "temperature": 5e-324}, 200, None),
    ({"prompt": "a\ud800b"}, 400, "prompt"),
    ({"prompt": [[5] * 10] * 9}, 400, "prompt"),
    ({"prompt": [[5] * 255] * 257}, 400, "prompt"),
    ({"prompt": [[5] * 60] * 8, "max_tokens": 20}, 400, "max_tokens"),
    ({"prompt": ["x"] * 8, "logprobs": 5, "max_tokens": 2}, 400, "logprobs"),
]


@pytest.mark.parametrize("body,status,param", HOSTILE, ids=[json.dumps(b[0])[:40] for b in HOSTILE])
def test_hostile_request_gets_its_answer_and_the_server_goes_on(server, body, status, param):
    content = json.dumps(body).encode()  # a lone surrogate goes as the JSON escape \ud800
    r = httpx.post(f"{server.url}/v1/completions", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    if status != 200:
        err = r.json()["error"]
        assert err["param"] == param and (err["code"] is None or isinstance(err["code"], str)), err
        if status == 400 and "prompt" in body and isinstance(body["prompt"], list) and param != "seed":
            assert err["code"] == "request_too_large" and "server.max_" in err["message"]
    still_serving(server.url)


def test_tiny_temperature_is_greedy(server):
    body = {"prompt": "the same", "max_tokens": 8, "ignore_eos": True}
    a = httpx.post(f"{server.url}/v1/completions", json=body | {"temperature": 0}).json()
    b = httpx.post(f"{server.url}/v1/completions", json=body | {"temperature": 1e-300, "seed": 3}).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_a_failing_row_fails_its_request_alone(server):
    """Rows that raise in the runner or give NaN logits (sampling fails) end their own request with
    a 500 (or a stream error event) and no internal detail; the requests beside them in the same
    steps finish with the tokens they get alone."""
    prompts = [[11 + i, 22, 33 + i, 44] for i in range(8)]
    alone = [greedy(server.url, p, 12) for p in prompts]
    before = errors(server, 500)

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            async def batch(p, n=12):
                return await c.post("/generate", json={"prompt": p, "max_new_tokens": n, "ignore_eos": True})

            async def stream(p):
                body = {"prompt": p, "max_tokens": 12, "temperature": 0, "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    return r.status_code, [line async for line in r.aiter_lines() if line.startswith("data: ")]

            poisoned = [batch([1, 2, RAISE, 4]), batch([5, NAN, 7]),
                        stream([8, RAISE, 9]), c.post("/v1/completions", json={
                            "prompt": [[3, 4, 5], [6, NAN, 7]], "max_tokens": 5, "temperature": 0.8, "seed": 1})]
            return await asyncio.gather(*(batch(p) for p in prompts), *poisoned)

    out = asyncio.run(run())
    good, (raised, nan, (status, events), pair) = out[:8], out[8:]
    for r, want in zip(good, alone):
        assert r.status_code == 200 and r.json()["token_ids"] == want
    for r in (raised, nan, pair):
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["code"] == "internal_error" and "detail" not in err["message"] and "Error" not in err["message"]
    assert status == 200 and events[-1] == "data: [DONE]"
    err = json.loads(events[-2][6:])["error"]
    assert err["code"] == "internal_error" and "poisoned" not in err["message"]
    assert errors(server, 500) >= before + 5  # 1 + 1 + 1 + both prompts of the pair
    assert wait_idle(server.url)["kv_usage"] == 0
    still_serving(server.url)
    # Every row of a step failing is still the requests' fault, not the runner's: the engine lives.
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": [[RAISE, 1], [2, RAISE]], "max_tokens": 2})
    assert r.status_code == 500
    still_serving(server.url)
    rows = [r for r in csv.DictReader(server.log_path.open()) if r["status"] == "500"]
    assert rows and all(int(r["prompt_tokens"]) > 0 and r["finish_reason"] == "error" for r in rows)


def test_a_failed_step_still_frees_the_rows_of_finished_requests(poison_backend):
    """onnxruntime keeps one cache row per running sequence and frees a row when a step tells it the
    sequence ended. A step whose first rows fail must still pass that on: 8 rounds of a finished
    request, then a failing one beside a good one, on 2 rows; no row may leak."""
    from mini_engine import Engine
    from mini_engine.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    with Engine.from_config(None, model="random:tiny", backend="poisonort", **{"scheduler.max_num_seqs": 2}) as e:
        def run() -> dict:
            ends = {}
            while e.has_unfinished_requests():
                for out in e.step():
                    if out.finished:
                        ends[out.request_id] = out.finish_reason
            return ends

        for i in range(8):
            e.add_request(f"a{i}", [5, 6, 7], params)
            assert run() == {f"a{i}": "length"}
            e.add_request(f"p{i}", [8, RAISE, 9], params)  # first in the step: its half fails alone
            e.add_request(f"b{i}", [10, 11, 12], params)
            assert run() == {f"p{i}": "error", f"b{i}": "length"}, i


def test_timed_out_stream_of_a_client_that_does_not_read(hf_dir, tmp_path):
    """A client that sends a streamed request and stops reading: at the request's deadline the
    engine aborts every prompt of it (its KV is freed, others are served meanwhile), the stream
    holds a timeout error event and [DONE], and every prompt has its log row and error metric."""
    log = tmp_path / "requests.csv"
    with running_server("random:gpt2", overrides={"server.request_timeout_s": 2.0, "server.log_csv": str(log)}) as s:
        httpx.post(f"{s.url}/v1/completions", json={"prompt": "warm", "max_tokens": 2})
        host, port = s.url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = json.dumps({"prompt": ["never read"] * 4, "max_tokens": 800, "ignore_eos": True, "stream": True,
                           "temperature": 0}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.5)
        still_serving(s.url)  # served beside the non-reading client
        stats = wait_idle(s.url, timeout=10)  # the deadline aborted all four
        assert stats["kv_usage"] == 0
        assert s.state.metrics._errors.labels(model_name=s.model_name, status="504")._value.get() == 4
        sock.settimeout(15)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
            if data.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
                break
        sock.close()
        compact = data.replace(b" ", b"")
        assert b'"code":"timeout"' in compact and compact.index(b'"code":"timeout"') < compact.index(b"data:[DONE]")
    rows = [r for r in csv.DictReader(log.open()) if r["status"] == "504"]
    assert len(rows) == 4 and all(r["finish_reason"] == "timeout" and int(r["prompt_tokens"]) > 0 for r in rows)


def test_a_stream_whose_reader_falls_behind_is_aborted():
    """AsyncEngine's bound: a reader more than max_stream_backlog outputs behind gets its request
    aborted (no more compute, no more memory) and, when it reads again, the end of its stream."""
    from mini_engine import Engine
    from mini_engine.async_engine import AsyncEngine, StreamBacklogFull
    from mini_engine.sampling import SamplingParams

    with Engine(model="random:tiny", backend="torch") as engine, \
            AsyncEngine(engine, max_stream_backlog=5) as ae:
        stream = ae.submit([1, 2, 3], SamplingParams(max_new_tokens=60, ignore_eos=True))
        deadline = time.monotonic() + 30
        while (engine.has_unfinished_requests() or not ae.idle) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not engine.has_unfinished_requests() and engine.scheduler.block_manager.usage == 0
        got = []
        with pytest.raises(StreamBacklogFull):
            for out in stream:
                got.append(out)
        assert len(got) == 6  # the backlog it was allowed, plus the one that passed the bound


def test_a_stalled_multi_prompt_stream_is_aborted_too():
    """The server's merge of a request's prompt streams passes the stall on: a consumer that takes
    one increment and stops leaves the rest in the prompts' own streams, whose bound aborts them."""
    from mini_engine import Engine
    from mini_engine.async_engine import AsyncEngine
    from mini_engine.sampling import SamplingParams
    from mini_engine.server.state import merge_streams

    async def stall(ae, engine):
        streams = [ae.submit([1, 2, i], SamplingParams(max_new_tokens=60, ignore_eos=True)) for i in range(3)]
        merged = merge_streams(streams)
        await merged.__anext__()  # one increment, then the client stops reading
        deadline = time.monotonic() + 30
        while engine.has_unfinished_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        left = engine.has_unfinished_requests()
        await merged.aclose()
        return left

    with Engine(model="random:tiny", backend="torch") as engine, \
            AsyncEngine(engine, max_stream_backlog=5) as ae:
        assert asyncio.run(stall(ae, engine)) is False
        assert engine.scheduler.block_manager.usage == 0


def test_browser_safety(hf_dir):
    with running_server(str(hf_dir)) as s:
        port = s.url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "127.9.9.9"):
            assert httpx.get(f"{s.url}/v1/models", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "[::2]"):
            r = httpx.get(f"{s.url}/v1/models", headers={"Host": host})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", host
    key = {"server.api_key": "s3cret", "server.cors": True, "server.cors_origins": ["http://app.example"]}
    with running_server(str(hf_dir), overrides=key) as s:
        pre = httpx.options(f"{s.url}/v1/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.get(f"{s.url}/v1/models", headers={"Origin": "http://app.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://app.example"
        ok = httpx.get(f"{s.url}/v1/models", headers={"Authorization": "Bearer s3cret", "Host": "any.name"})
        assert ok.status_code == 200  # with a key, any Host
        two = httpx.get(f"{s.url}/v1/models", headers=[("Authorization", "Bearer wrong"),
                                                        ("Authorization", "Bearer s3cret")])
        assert two.status_code == 400 and two.json()["error"]["code"] == "invalid_api_key"


def test_slow_headers_are_cut_off(hf_dir):
    """Slowloris: connections that dribble their headers are closed after server.header_timeout_s,
    and requests that arrive meanwhile are served."""
    with running_server(str(hf_dir), overrides={"server.header_timeout_s": 1.0}) as s:
        host, port = s.url.removeprefix("http://").split(":")
        socks = []
        for _ in range(20):
            sk = socket.create_connection((host, int(port)))
            sk.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            sk.settimeout(0.1)
            socks.append(sk)
        closed = set()
        t0 = time.monotonic()
        while len(closed) < len(socks) and time.monotonic() - t0 < 10:
            for i, sk in enumerate(socks):
                if i in closed:
                    continue
                try:
                    sk.sendall(b"X")  # a header byte now and then
                    if sk.recv(1024) == b"":
                        closed.add(i)
                except socket.timeout:
                    pass
                except OSError:
                    closed.add(i)
            time.sleep(0.2)
        assert len(closed) == len(socks), f"{len(socks) - len(closed)} slow connections still open"
        assert time.monotonic() - t0 < 5
        still_serving(s.url)
        for sk in socks:
            sk.close()


def test_log_lines_escape_control_characters():
    import logging

    from mini_engine.server.launcher import OneLineFormatter

    rec = logging.LogRecord("mini_engine.server", logging.WARNING, __file__, 1, "%s %s -> 404",
                            ("GET", "/x\n2026-01-01 INFO forged\r\x1b[31m"), None)
    line = OneLineFormatter("%(message)s").format(rec)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\\x0a2026" in line


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def test_sigterm_with_a_non_reading_client_exits_within_the_grace(tmp_path):
    """`serve` with shutdown_grace_s = 0.5: SIGTERM while a client holds a stream it does not
    read; the process exits 0 within seconds. A %0a in a path logged raw (the 401 of a request
    without the key) stays in its own line, escaped."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mini_engine", "serve", "--model", "random:gpt2", "--port",
                             str(port), "--api-key", "k", "--set", "server.shutdown_grace_s=0.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port)) as raw:  # sent as is (httpx would drop the %0a)
            raw.sendall(b"GET /x%0a2026-12-07%2000:00:00,000%20INFO%20mini_engine.server:%20FORGED HTTP/1.1\r\n"
                        b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert raw.recv(100).startswith(b"HTTP/1.1 401")
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = json.dumps({"prompt": ["x"] * 4, "max_tokens": 900, "ignore_eos": True, "stream": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer k\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(1.0)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - t
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert took < 10, f"exited {took:.1f} s after SIGTERM"
    assert not any(line.split(" ", 3)[-1].startswith("FORGED") or line.startswith("2026-12-07 00:00:00,000")
                   for line in err.splitlines()), err
    assert "\\x0a2026-12-07" in err, err.splitlines()


@pytest.mark.parametrize("key,value", [("max_prompts_per_request", 0), ("max_tokens_per_request", 0),
                                       ("max_logprobs_per_request", 0), ("max_stream_backlog", 0),
                                       ("max_connections", 0), ("header_timeout_s", 0.0),
                                       ("shutdown_grace_s", -1.0), ("shutdown_grace_s", float("nan")),
                                       ("request_timeout_s", float("inf"))])
def test_bad_bounds_are_one_line_config_errors(key, value):
    from mini_engine.errors import ConfigError
    from mini_engine.server.server_config import ServerConfig

    with pytest.raises(ConfigError, match=f"server.{key} must be"):
        ServerConfig(**{key: value})
