"""`mini-engine serve --ray` as users run it: a real local Ray cluster started by the CLI, Ray
Serve's HTTP proxy on 127.0.0.1, two engine replicas of random:tiny, real HTTP.

How a test knows which replica answered: every replica adds `x-mini-engine-replica: <its Ray
Serve replica id>` to its responses (mini_engine.server.ray_deployment.ReplicaHeader). Which
processes are Ray's: the CLI's descendants (raylet, gcs_server, workers), recorded while it
runs, all of which must be gone after it stops.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import run_cli
from server_util import running_server

REPLICA = "x-mini-engine-replica"
PROMPTS = ["Hello, my name is", "The capital of France", "1 2 3 4 5 6 7 8", "In a hole in the ground there lived",
           "a", "Once upon a time, in a land far away, there was", "The quick brown fox", "GPT-2 is"]
MAX_TOKENS = 12
LONG = 64  # the replica-kill test: requests long enough that some are running when the kill comes
START_TIMEOUT_S = 180  # a local cluster, two replicas loading torch, on two shared cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(prompt: str, max_tokens: int = MAX_TOKENS, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **extra}


class Cluster:
    """A `mini-engine serve --ray` (or `serve run`) subprocess in its own session, so that a
    signal reaches only the driver, as when a user sends it to the PID."""

    def __init__(self, args: list[str], log: Path, ready: str, port: int, env: dict | None = None):
        self.log, self.url, self.port = log, f"http://127.0.0.1:{port}", port
        self.out = log.open("w")
        self.proc = subprocess.Popen(args, stdout=self.out, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                                          "RAY_DEDUP_LOGS": "0", **(env or {})},
                                     start_new_session=True)
        self.seen: dict[int, float] = {}  # pid -> create_time of every descendant ever seen
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready(ready):
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before ready:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"not ready in {START_TIMEOUT_S} s:\n{self.tail()}")
            time.sleep(0.5)
        self.record()

    def ready(self, marker: str) -> bool:
        """`marker` in the log, or for "/health" a 200 from the proxy."""
        if marker != "/health":
            return marker in self.text()
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def replica_ids(self) -> dict[int, str]:
        """pid -> Ray Serve replica id, from the replicas' "replica ID: ... ready" log lines
        (Ray prefixes each forwarded line with the process's pid)."""
        found = re.findall(r"pid=(\d+)\)\S*\s.*?replica (\w+): .* ready after", self.text())
        return {int(pid): rid for pid, rid in found}

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def record(self) -> list[psutil.Process]:
        procs = psutil.Process(self.proc.pid).children(recursive=True)
        for p in procs:
            try:
                self.seen.setdefault(p.pid, p.create_time())
            except psutil.NoSuchProcess:
                pass
        return procs

    def replica_pids(self) -> list[int]:
        pids = []
        for p in self.record():
            try:
                if "ServeReplica:" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    pids.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        return pids

    def leftovers(self) -> list[str]:
        left = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{pid} {' '.join(p.cmdline())[:80]}")
            except psutil.NoSuchProcess:
                pass
        return left

    def wait_gone(self, timeout: float = 20) -> list[str]:
        """Leftovers once given a moment: some of Ray's helpers exit a second after the driver."""
        deadline = time.monotonic() + timeout
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.5)
        return self.leftovers()

    def stop(self, sig=signal.SIGTERM, timeout: float = 90) -> int:
        self.record()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.leftovers():  # never leave a cluster behind, even when a test failed
            with _suppress():
                os.kill(int(pid.split()[0]), signal.SIGKILL)
        self.out.close()


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))


@pytest.fixture(scope="module")
def reference():
    """Greedy outputs of the single-process server (`mini-engine serve`) for PROMPTS."""
    with running_server("random:tiny") as server, httpx.Client(base_url=server.url, timeout=60) as c:
        out = {p: c.post("/v1/completions", json=body(p)).json()["choices"][0]["text"] for p in PROMPTS}
        out |= {(p, LONG): c.post("/v1/completions", json=body(p, LONG)).json()["choices"][0]["text"]
                for p in PROMPTS}
        return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "serve.log"
    c = Cluster([sys.executable, "-m", "mini_engine", "serve", "--ray", "--replicas", "2", "--model", "random:tiny",
                 "--port", str(port), "--set", "server.shutdown_grace_s=5", "--set", "ray.health_check_period_s=2"],
                log, "mini-engine: serving", port)
    yield c
    c.kill()


def complete(url: str, prompt: str, timeout: float = 60, max_tokens: int = MAX_TOKENS) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body(prompt, max_tokens), timeout=timeout)


def test_two_replicas_serve_concurrent_requests_with_greedy_parity(cluster, reference):
    assert "2 replicas" in cluster.text() and len(cluster.replica_pids()) == 2
    answered: dict[str, int] = {}
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        for _ in range(4):  # the proxy picks replicas at random (power of two choices): a few rounds
            for prompt, r in zip(PROMPTS, pool.map(lambda p: complete(cluster.url, p), PROMPTS)):
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == reference[prompt], prompt
                answered[r.headers[REPLICA]] = answered.get(r.headers[REPLICA], 0) + 1
            if len(answered) == 2:
                break
    assert len(answered) == 2, f"every request went to one replica: {answered}"

    # Streaming through the proxy: Server-Sent Events, the same text as the whole completion.
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body(PROMPTS[0], stream=True), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == reference[PROMPTS[0]]


def test_the_same_routes_health_and_metrics_through_the_proxy(cluster):
    from prometheus_client.parser import text_string_to_metric_families

    with httpx.Client(base_url=cluster.url, timeout=30) as c:
        health = c.get("/health")
        assert health.status_code == 200 and health.json() == {"status": "ok", "model": "random:tiny"}
        assert c.get("/v1/models").json()["data"][0]["id"] == "random:tiny"
        gen = c.post("/generate", json={"prompt": "Hello", "max_new_tokens": 4, "ignore_eos": True})
        assert gen.status_code == 200 and gen.json()["usage"]["completion_tokens"] == 4
        bad = c.post("/v1/completions", json={"prompt": "x", "max_tokens": "10"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
        assert c.post("/v1/chat/completions", json={}).json()["error"]["code"] == "chat_not_supported"
        metrics = c.get("/metrics")
        names = {f.name for f in text_string_to_metric_families(metrics.text)}
        assert {"mini_engine:e2e_request_latency_seconds", "mini_engine:num_requests_running"} <= names
        assert metrics.headers[REPLICA]  # a replica's own metrics: it says which
        stats = c.get("/stats").json()
        assert stats["alive"] is True


def test_a_killed_replica_is_replaced_and_no_client_hangs_or_gets_a_wrong_answer(cluster, reference):
    before = cluster.replica_pids()
    assert len(before) == 2
    # (prompt, replica, status, text or error, start, end): status None = the client timed out
    outcomes: list[tuple] = []
    stop = threading.Event()

    def client(i: int):
        n = 0
        while not stop.is_set() and n < 30:
            prompt = PROMPTS[(i + n) % len(PROMPTS)]
            n += 1
            t0 = time.monotonic()
            try:
                r = complete(cluster.url, prompt, timeout=30, max_tokens=LONG)  # bounded: a hang fails the test
            except httpx.TimeoutException as e:
                outcomes.append((prompt, "", None, f"timeout: {e!r}", t0, time.monotonic()))
                continue
            except httpx.TransportError as e:  # a dropped connection is a clear error to the client
                outcomes.append((prompt, "", -1, repr(e), t0, time.monotonic()))
                continue
            text = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
            outcomes.append((prompt, r.headers.get(REPLICA, ""), r.status_code, text, t0, time.monotonic()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(3.0)  # load on both replicas
    victim = before[0]
    victim_id = cluster.replica_ids()[victim]
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    # Ray replaces it: two live replicas again, one of them a new process.
    deadline = killed_at + 90
    while time.monotonic() < deadline:
        now = cluster.replica_pids()
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.5)
    replaced_in = time.monotonic() - killed_at
    now = cluster.replica_pids()
    assert len(now) == 2 and victim not in now, f"not replaced within 90 s: {now}\n{cluster.tail()}"
    time.sleep(2.0)  # and the load goes on against the new replica set
    stop.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)

    timeouts = [o[:4] for o in outcomes if o[2] is None]
    assert not timeouts, f"clients hung: {timeouts}"
    wrong = [o[:4] for o in outcomes if o[2] == 200 and o[3] != reference[(o[0], LONG)]]
    assert not wrong, f"wrong answers: {wrong}"
    errors = [o[:4] for o in outcomes if o[2] != 200]
    assert all(o[2] == -1 or o[2] >= 500 for o in errors), errors
    assert all(o[3] for o in errors), errors  # every error says something
    across = [o for o in outcomes if o[4] < killed_at < o[5]]  # in flight when the kill came
    assert len(across) >= 2, "the kill did not come mid-load"
    assert any(o[1] == victim_id for o in outcomes if o[5] < killed_at), "the victim served nothing before"
    assert sum(o[2] == 200 for o in outcomes) >= 10, [o[:4] for o in outcomes]

    # The new replica serves: its id shows up in answers once it is routed to.
    old_ids = {o[1] for o in outcomes if o[2] == 200 and o[1] and o[5] < killed_at}
    seen_new = {o[1] for o in outcomes if o[2] == 200 and o[1] and o[1] not in old_ids}
    deadline = time.monotonic() + 60
    while not seen_new and time.monotonic() < deadline:
        with ThreadPoolExecutor(4) as pool:
            for prompt, r in zip(PROMPTS[:4], pool.map(lambda p: complete(cluster.url, p), PROMPTS[:4])):
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference[prompt]
                if r.headers[REPLICA] not in old_ids:
                    seen_new.add(r.headers[REPLICA])
    assert seen_new, f"no answer from a new replica (old: {old_ids})"
    print(f"\nreplica {victim_id} (pid {victim}) SIGKILLed with {len(across)} requests in flight; replaced in {replaced_in:.1f} s; "
          f"{len(outcomes)} requests: {sum(o[2] == 200 for o in outcomes)} complete and correct, errors: "
          f"{[(o[2], o[3][:120]) for o in errors]}; in flight at the kill: "
          f"{[(o[2], o[1]) for o in across]}")


def test_sigterm_stops_the_deployment_and_leaves_no_ray_process(cluster):
    assert len(cluster.seen) >= 4  # raylet, gcs_server, controller, proxy, replicas
    rc = cluster.stop(signal.SIGTERM)
    assert rc == 0, cluster.tail()
    assert "mini-engine: stopped" in cluster.text()
    assert cluster.wait_gone() == []
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{cluster.url}/health", timeout=2)


def test_the_written_serve_config_runs_with_serve_run_and_autoscales_on_ongoing_requests(tmp_path, reference):
    """The Serve config file path (what `serve run` / `serve deploy` read on any cluster), with
    autoscaling 1..2 replicas on ongoing requests per replica: load makes Ray add the second."""
    port = free_port()
    cfg = tmp_path / "serve.yaml"
    run_cli("serve", "--ray", "--write-serve-config", cfg, "--model", "random:tiny", "--port", port,
            "--autoscale", "1:2", "--set", "ray.num_cpus_per_replica=0.5", "--set", "ray.target_ongoing_requests=1",
            "--set", "ray.upscale_delay_s=0", check=True)
    import yaml

    data = yaml.safe_load(cfg.read_text())
    app = data["applications"][0]
    deployment = app["deployments"][0]
    assert data["http_options"] == {"host": "127.0.0.1", "port": port}
    assert app["import_path"] == "mini_engine.server.ray_deployment:app_builder"
    assert deployment["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert deployment["autoscaling_config"]["max_replicas"] == 2 and "num_replicas" not in deployment
    # As a user tunes a Serve config: a short look-back so the test sees the decision in seconds.
    deployment["autoscaling_config"]["look_back_period_s"] = 2
    cfg.write_text(yaml.safe_dump(data))
    serve_bin = Path(sys.executable).with_name("serve")
    c = Cluster([str(serve_bin), "run", str(cfg)], tmp_path / "serve-run.log", "/health", port,
                env={"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
                     "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5"})
    try:
        r = complete(c.url, PROMPTS[1])
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference[PROMPTS[1]]
        assert len(c.replica_pids()) == 1
        stop = threading.Event()
        bad: list[str] = []

        def client(i: int):
            while not stop.is_set():
                prompt = PROMPTS[i % len(PROMPTS)]
                r = complete(c.url, prompt, timeout=30, max_tokens=LONG)
                if r.status_code != 200 or r.json()["choices"][0]["text"] != reference[(prompt, LONG)]:
                    bad.append(r.text[:200])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(c.replica_pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        scaled = len(c.replica_pids())
        stop.set()
        for t in threads:
            t.join(60)
        assert scaled == 2, f"no second replica within 60 s of load:\n{c.tail()}"
        assert not bad, bad
        assert c.stop(signal.SIGINT) == 0, c.tail()
        assert c.wait_gone() == []
    finally:
        c.kill()


def test_ray_flags_and_keys_are_one_line_errors():
    for args, expected in [
        (["--replicas", "2"], "--replicas applies to serving on Ray; add --ray"),
        (["--ray", "--autoscale", "3:1"], "--autoscale 3:1: need 0 <= MIN <= MAX"),
        (["--ray", "--autoscale", "two"], "--autoscale expects MIN:MAX"),
        (["--ray", "--replicas", "2", "--autoscale", "1:2"], "exclude each other"),
        (["--ray", "--set", "ray.replicas=2"], "unknown config key 'ray.replicas'"),
        (["--ray", "--write-serve-config", "x.yaml", "--port", "0"], "needs a fixed port"),
        (["--ray", "--model", "/nonexistent/ckpt"], "does not exist"),  # before any Ray process starts
        (["--ray", "--ray-address", f"127.0.0.1:{free_port()}"], "no Ray cluster answers at 127.0.0.1:"),
        (["--ray", "--ray-address", "head-node"], "ray.address must be 'auto' or HOST:PORT"),
    ]:
        proc = run_cli("serve", "--model", "random:tiny", *args, timeout=60)
        lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("note: ")]  # random weights
        assert proc.returncode != 0 and len(lines) == 1 and expected in lines[0], (args, proc.stderr)


def test_without_ray_installed_ray_is_one_line_saying_how_to_install_it(tmp_path):
    # Shadow the installed package with one that fails to import, as on a machine without it.
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = run_cli("serve", "--ray", "--model", "random:tiny", env=env, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "pip install 'mini-engine[ray]'" in lines[0]


def test_deployment_options_mirror_the_config():
    from mini_engine.config import load_config
    from mini_engine.errors import ConfigError
    from mini_engine.server.ray_deployment import deployment_options, replica_config

    cfg = load_config(None, **{"ray.min_replicas": 1, "ray.max_replicas": 4, "server.max_concurrent_requests": 64,
                               "scheduler.max_num_seqs": 8, "ray.num_cpus_per_replica": 2.0})
    opts = deployment_options(cfg)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                          "target_ongoing_requests": 8.0, "upscale_delay_s": 30.0,
                                          "downscale_delay_s": 600.0}
    assert opts["max_ongoing_requests"] == 64
    assert opts["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0.0}
    assert "ray" not in replica_config(cfg)
    gpu = load_config(None, **{"backend.device": "cuda", "ray.num_replicas": 2})
    assert deployment_options(gpu)["ray_actor_options"]["num_gpus"] == 1.0
    assert deployment_options(gpu)["num_replicas"] == 2
    with pytest.raises(ConfigError, match="must be 'cuda'"):
        deployment_options(load_config(None, **{"backend.device": "cuda:1"}))
