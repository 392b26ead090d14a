"""`mini-engine serve` as users run it: a subprocess, real signals, the request log on disk."""
from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path, *extra):
    port = free_port()
    log = tmp_path / "requests.csv"
    proc = subprocess.Popen([sys.executable, "-m", "mini_engine", "serve", "--model", "random:gpt2", "--port", str(port),
                             "--log-csv", str(log), "--set", "server.shutdown_grace_s=20", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("serve did not become healthy in 120 s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_finishes_in_flight_requests_and_flushes_the_log(tmp_path, sig):
    proc, url, log = start(tmp_path)
    try:
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "warm", "max_tokens": 2}).status_code == 200
        results = {}

        def stream():
            body = {"prompt": "in flight", "max_tokens": 40, "ignore_eos": True, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            results["events"] = events

        t = threading.Thread(target=stream)
        t.start()
        time.sleep(0.5)  # the request is running when the signal comes
        proc.send_signal(sig)
        time.sleep(0.3)
        with pytest.raises(httpx.HTTPError):  # no longer accepting
            httpx.post(f"{url}/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=2)
        t.join(60)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    events = results["events"]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 40 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    rows = list(csv.DictReader(log.open()))
    assert len(rows) == 2 and "2 rows written" in err and "stopped" in err
    streamed = rows[-1]
    assert streamed["mode"] == "stream" and streamed["status"] == "200" and streamed["output_tokens"] == "40"
    assert streamed["endpoint"] == "/v1/completions" and streamed["backend"] == "torch"
    assert float(streamed["ttft_ms"]) <= float(streamed["e2e_ms"]) and float(streamed["rss_mib"]) > 0


def test_bad_flags_are_one_line_errors(tmp_path):
    for args, want in ((["--port", "70000"], "70000"), (["--set", "server.colour=1"], "server.colour"),
                       (["--backend", "nope"], "nope")):
        p = subprocess.run([sys.executable, "-m", "mini_engine", "serve", "--model", "random:tiny", *args],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and want in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_port_in_use_is_one_line_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "mini_engine", "serve", "--model", "random:tiny", "--port", str(port)],
                           capture_output=True, text=True, timeout=120, env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert p.returncode != 0 and "cannot listen" in p.stderr and "Traceback" not in p.stderr, p.stderr
