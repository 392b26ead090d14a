#!/usr/bin/env python
"""The HTTP server under load: streaming vs batch (non-streaming) answers, an open-loop rate sweep,
HTTP vs the in-process AsyncEngine, idle memory and per-request overhead.

Per --targets entry, in a fresh worker interpreter: `mini-engine serve` runs as its own process
on 127.0.0.1 (a free port, --log-csv), and the worker drives it with mini_engine.bench.load_run
(the `mini-engine load` code), reading the server's /stats and its RSS (psutil on its pid):

a. closed loop at each --concurrency level, streaming and batch (the order alternates between
   levels), --prompt-len tokens of text, --max-tokens new tokens, ignore_eos, greedy;
b. open loop (Poisson) at --rate-fractions x the best closed-loop streaming request rate;
c. --clients concurrent streaming clients over HTTP vs the same prompts and params submitted to an
   AsyncEngine in the worker (same model and backend; the server idles meanwhile), and the same
   load in batch mode over HTTP, for --rounds rounds, alternating which goes first: tokens/s of HTTP
   over the Python API (target >= 0.90) and p50 TTFT streaming over p50 e2e batch (target <= 1/4);
d. one-token batch requests one at a time, HTTP vs AsyncEngine (the mean difference is the
   per-request cost of the HTTP path), and the server's RSS idle after start, after warm-up, at
   its peak and idle after the load.

Each timed run records the CPU that other processes used meanwhile (/proc/stat minus the server's and
the worker's own), so a shared machine's interference shows in the tables.
Every run's prompts come from a seed of its own, so no run's prompts are in the prefix cache of
an earlier one (the HTTP and API halves of a round share a seed: they are different engines).

    python benchmarks/serving_bench.py --out result/cpu/serving/serving
    python benchmarks/serving_bench.py --quick            # random:tiny smoke run, a minute
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import command_line, copy_bandwidth_gbps, cpu_model, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS_DEFAULT = "torch,onnxruntime"
KEYS = ("median_ttft_ms", "p95_ttft_ms", "median_e2el_ms", "p95_e2el_ms", "mean_e2el_ms", "median_tpot_ms",
        "median_itl_ms", "p99_itl_ms", "output_throughput", "request_throughput", "completed", "failed", "duration",
        "mean_ttft_ms", "p99_ttft_ms", "p90_ttft_ms", "total_output_tokens")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="[random:gpt2; --quick: random:tiny]")
    p.add_argument("--targets", default=TARGETS_DEFAULT, help="backends (backend or backend:device), comma-separated")
    p.add_argument("--concurrency", default=None, help="closed-loop levels [1,4,16,64; --quick: 1,4,16]")
    p.add_argument("--num-requests", type=int, default=0,
                   help="requests per closed-loop run [0: max(2*C, 16), at most 128; --quick: 8]")
    p.add_argument("--prompt-len", type=int, default=None, help="[64; --quick 16]")
    p.add_argument("--max-tokens", type=int, default=None, help="[64; --quick 16]")
    p.add_argument("--rate-fractions", default=None,
                   help="open-loop rates as fractions of the best closed-loop streaming req/s [0.25,0.5,0.9,1.5]")
    p.add_argument("--rate-requests", type=int, default=None, help="requests per open-loop run [32; --quick 8]")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients of part c [16]")
    p.add_argument("--rounds", type=int, default=None, help="rounds of part c [3; --quick 1]")
    p.add_argument("--overhead-requests", type=int, default=None,
                   help="one-token requests per block of part d (2 blocks each way) [20; --quick 4]")
    p.add_argument("--parts", default="abcd", help="which parts to run (a closed loop, b rate sweep, c HTTP vs "
                                                   "API, d overhead and memory; c and d always run together) [abcd]")
    p.add_argument("--quick", action="store_true", help="smoke run: random:tiny, tiny request counts")
    p.add_argument("--out", default=None, help="OUT.json/.md, plots and logs beside it "
                                               "[result/cpu/serving/serving; --quick: /tmp/serving_quick/serving]")
    p.add_argument("--no-analyze", action="store_true", help="skip `mini-engine analyze` of the first target's log")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--log-csv", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"model": ("random:gpt2", "random:tiny"), "concurrency": ("1,4,16,64", "1,4,16"),
                "prompt_len": (64, 16), "max_tokens": (64, 16), "rate_fractions": ("0.25,0.5,0.9,1.5", "0.5,1.5"),
                "rate_requests": (32, 8), "rounds": (3, 1), "overhead_requests": (20, 4),
                "out": ("result/cpu/serving/serving", "/tmp/serving_quick/serving")}
    for k, (full, quick) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, quick if q else full)
    if q and not args.num_requests:
        args.num_requests = 8
    return args


# ----- the server process ------------------------------------------------------------------
class ServerProcess:
    """`mini-engine serve` in its own process on 127.0.0.1 and a free port; `.url`, `.pid`, `.rss_mib()`."""

    def __init__(self, model: str, backend: str, device: str = "cpu", log_csv: str | None = None,
                 stderr_path: str | None = None, extra: list[str] | None = None, start_timeout: float = 300.0):
        import psutil

        cmd = [sys.executable, "-m", "mini_engine", "serve", "--model", model, "--backend", backend,
               "--device", device, "--host", "127.0.0.1", "--port", "0", *(extra or [])]
        if log_csv:
            Path(log_csv).parent.mkdir(parents=True, exist_ok=True)
            Path(log_csv).unlink(missing_ok=True)  # the server appends: one run per log
            cmd += ["--log-csv", log_csv]
        self.cmd = cmd
        self.log_csv = log_csv
        self.lines: list[str] = []
        self._err = open(stderr_path, "w") if stderr_path else None
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.url: str | None = None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip("\n"))
                if self._err:
                    self._err.write(line)
                    self._err.flush()
                if self.url is None and "serving" in line and " on http://" in line:
                    self.url = line.split(" on ", 1)[1].split()[0]
                    ready.set()
            ready.set()

        self._reader = threading.Thread(target=read, daemon=True)
        self._reader.start()
        t = time.perf_counter()
        ready.wait(start_timeout)
        self.start_s = time.perf_counter() - t
        if self.url is None:
            self.stop()
            raise RuntimeError(f"the server did not start: {' | '.join(self.lines[-5:])}")
        self.ps = psutil.Process(self.pid)

    def rss_mib(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def hwm_mib(self) -> float | None:
        """The kernel's peak RSS of the process (VmHWM)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def stats(self) -> dict:
        import httpx

        return httpx.get(f"{self.url}/stats", timeout=10, trust_env=False).json()

    def wait_idle(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        s = {}
        while time.monotonic() < deadline:
            s = self.stats()
            if s["admitted"] == 0 and s["running"] == 0 and s["waiting"] == 0 and s["kv_usage"] == 0:
                return s
            time.sleep(0.05)
        raise RuntimeError(f"the server did not go idle in {timeout} s: {s}")

    def stop(self, timeout: float = 90.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        if self._err:
            self._err.close()
            self._err = None
        return self.proc.returncode


class RssSampler:
    """Peak RSS of a process while a block runs (sampled every 0.1 s)."""

    def __init__(self, server: ServerProcess, period: float = 0.1):
        self.server, self.period = server, period
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self):
        self.peak = self.server.rss_mib()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(self.period):
            try:
                self.peak = max(self.peak, self.server.rss_mib())
            except Exception:  # noqa: BLE001 - the process may be gone
                return

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def read_log_rows(path: str, skip: int, expect: int, timeout: float = 10.0) -> list[dict]:
    """Rows `skip`.. of the server's request log, waiting for its writer thread to flush `expect` of them."""
    import csv

    deadline = time.monotonic() + timeout
    rows: list[dict] = []
    while True:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))[skip:]
        if len(rows) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all cores, /proc/stat; idle and iowait excluded)."""
    vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


class Foreign:
    """CPU used during a block by processes other than `mine` (pids), in % of one core: other users of
    the machine that would skew the timing. `mine` includes this process."""

    def __init__(self, pids):
        import psutil

        self.procs = [psutil.Process()] + [psutil.Process(p) for p in pids]
        self.pct = None

    def _mine(self) -> float:
        total = 0.0
        for p in self.procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # noqa: BLE001 - a process that ended
                pass
        return total

    def __enter__(self):
        self.t, self.busy, self.mine = time.perf_counter(), busy_cpu_s(), self._mine()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t
        other = (busy_cpu_s() - self.busy) - (self._mine() - self.mine)
        self.pct = max(other, 0.0) / dt * 100 if dt > 0 else None


def median_of(rows: list[dict], key: str) -> float | None:
    vals = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return statistics.median(vals) if vals else None


# ----- the worker ----------------------------------------------------------------------------
def worker(args) -> dict:
    import mini_engine  # noqa: F401 - first: it sets OpenBLAS's thread timeout before numpy loads OpenBLAS
    import asyncio

    from mini_engine.bench.load_prompts import synthetic_prompts
    from mini_engine.bench.load_run import LoadConfig, run_load

    backend, _, device = args.worker.partition(":")
    device = device or "cpu"
    L, K = args.prompt_len, args.max_tokens
    levels = [int(c) for c in args.concurrency.split(",")]
    log_csv = args.log_csv
    seeds = iter(range(1000, 100000))  # a fresh seed per run: no run's prompts are cached by an earlier one
    t_worker = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{args.worker} {time.perf_counter() - t_worker:6.1f}s] {msg}", file=sys.stderr, flush=True)

    server = ServerProcess(args.model, backend, device, log_csv=log_csv,
                           stderr_path=str(Path(log_csv).with_suffix(".server.log")))
    say(f"server {server.url} pid {server.pid} up in {server.start_s:.1f} s")
    out: dict = {"target": f"{backend}:{device}", "status": "ok", "server_cmd": " ".join(server.cmd[1:]),
                 "server_notes": [ln for ln in server.lines if ln.startswith("note:")]}
    rss = {"after_start": server.rss_mib()}
    log_seen: dict[int, int] = {}
    servers = [server]

    def my_pids():
        return [x.pid for x in servers]

    def load(*, n: int, stream: bool, concurrency=None, rate=None, prompt_len=L, max_tokens=K, seed=None,
             deadline=600.0, srv=None):
        srv = srv or server
        cfg = LoadConfig(url=srv.url, num_requests=n, concurrency=concurrency, request_rate=rate, stream=stream,
                         prompt_len=prompt_len, max_tokens=max_tokens, ignore_eos=True, temperature=0.0,
                         seed=next(seeds) if seed is None else seed, timeout_s=deadline, deadline_s=deadline)
        s0 = srv.stats()
        with RssSampler(srv) as sampler, Foreign(my_pids()) as foreign:
            res = run_load(cfg)
        s1 = srv.wait_idle()
        rows = read_log_rows(srv.log_csv, log_seen.get(srv.pid, 0), n)
        log_seen[srv.pid] = log_seen.get(srv.pid, 0) + len(rows)
        sm = res.summary
        steps = s1["steps"] - s0["steps"]
        fig = {k: sm.get(k) for k in KEYS} | {
            "stream": stream, "concurrency": concurrency, "rate": rate, "num_requests": n, "seed": cfg.seed,
            "errors": res.errors(), "peak_rss_mib": sampler.peak, "foreign_cpu_pct": foreign.pct,
            "loadavg_1m": os.getloadavg()[0], "steps": steps,
            "mean_rows_per_step": (s1["rows_stepped"] - s0["rows_stepped"]) / steps if steps else None,
            "runner_s": s1["runner_s"] - s0["runner_s"],
            "server_median_ttft_ms": median_of(rows, "ttft_ms"), "server_median_e2e_ms": median_of(rows, "e2e_ms"),
            "server_median_queue_ms": median_of(rows, "queue_ms"), "log_rows": len(rows)}
        if sm["failed"]:
            say(f"  {sm['failed']} failed: {res.errors()}")
        return fig

    # warm-up: every batch size the engine will meet plans its shapes / compiles now, not in a timed run
    load(n=args.clients, concurrency=args.clients, stream=True, max_tokens=8)
    load(n=2, concurrency=1, stream=False, max_tokens=4)
    load(n=4, concurrency=4, stream=False, max_tokens=4)
    rss["after_warmup"] = server.rss_mib()
    say(f"warm: rss {rss['after_warmup']:.0f} MiB")

    # a. streaming vs batch, closed loop
    closed = []
    for i, c in enumerate(levels if "a" in args.parts else []):
        n = args.num_requests or min(max(2 * c, 16), 128)
        for stream in ((True, False) if i % 2 == 0 else (False, True)):
            f = load(n=n, concurrency=c, stream=stream)
            closed.append(f)
            say(f"C={c:3d} {'stream' if stream else 'batch '}: ttft p50 {f['median_ttft_ms']:.0f} ms, "
                f"e2e p50 {f['median_e2el_ms']:.0f} ms, {f['output_throughput']:.1f} tok/s, "
                f"{f['request_throughput']:.2f} req/s, rss peak {f['peak_rss_mib']:.0f} MiB, "
                f"other CPU {f['foreign_cpu_pct']:.0f}%")
    out["closed"] = closed

    # b. open-loop rate sweep (streaming), calibrated on the closed loop
    sat = max((f["request_throughput"] for f in closed if f["stream"]), default=None)
    sweep = []
    for frac in (float(x) for x in args.rate_fractions.split(",") if sat is not None and "b" in args.parts):
        rate = frac * sat
        f = load(n=args.rate_requests, rate=rate, stream=True)
        f["fraction"] = frac
        sweep.append(f)
        say(f"rate {rate:.2f}/s ({frac:g}x): ttft p50 {f['median_ttft_ms']:.0f} p95 {f['p95_ttft_ms']:.0f} ms, "
            f"e2e p50 {f['median_e2el_ms']:.0f} ms, {f['output_throughput']:.1f} tok/s")
    out["rate_sweep"] = {"saturation_req_s": sat, "runs": sweep}

    # c. HTTP vs the in-process AsyncEngine, and streaming TTFT vs batch e2e
    from mini_engine.async_engine import AsyncEngine
    from mini_engine.engine import Engine

    engine = Engine(model=args.model, backend=backend, device=device)
    aengine = AsyncEngine(engine)
    params = engine.sampling_params(max_new_tokens=K, temperature=0.0, ignore_eos=True)
    weight_bytes = engine.source.config.weight_bytes(engine.config.model.dtype)
    kv_bytes_per_token = engine.runner.kv_bytes_per_token
    max_num_seqs = engine.config.scheduler.max_num_seqs

    async def api_run(prompts, p):
        async def one(text):
            t = time.perf_counter()
            first, n = None, 0
            async for o in aengine.submit(text, p):
                if first is None and o.new_token_ids:
                    first = time.perf_counter()
                n += len(o.new_token_ids)
            end = time.perf_counter()
            return (first - t) * 1e3, (end - t) * 1e3, n

        with Foreign(my_pids()) as foreign:
            t0 = time.perf_counter()
            got = await asyncio.gather(*(one(pr) for pr in prompts))
            dur = time.perf_counter() - t0
        return {"duration": dur, "foreign_cpu_pct": foreign.pct, "output_throughput": sum(g[2] for g in got) / dur,
                "median_ttft_ms": statistics.median(g[0] for g in got),
                "median_e2el_ms": statistics.median(g[1] for g in got), "total_output_tokens": sum(g[2] for g in got)}

    def api(seed: int, n: int, p, prompt_len=L):
        prompts = [pr.prompt for pr in synthetic_prompts(n, prompt_len, seed, "text")]
        return asyncio.run(api_run(prompts, p))

    api(next(seeds), args.clients, dataclass_replace(params, max_new_tokens=8))  # warm the in-process engine
    api(next(seeds), 1, dataclass_replace(params, max_new_tokens=4))
    variants = {"http": server}
    cl = args.clients
    rounds = []
    for r in range(args.rounds):
        seed = next(seeds)
        order = [*variants, "api"]
        order = order[r % len(order):] + order[:r % len(order)]  # each goes first in turn
        row = {"seed": seed, "order": " > ".join(order)}
        for what in order:
            if what == "api":
                row["api"] = api(seed, cl, params)
            else:
                row[what] = load(n=cl, concurrency=cl, stream=True, seed=seed, srv=variants[what])
        for what, srv in variants.items():
            row[what + "_batch"] = load(n=cl, concurrency=cl, stream=False, srv=srv)
        for what in variants:
            row[what + "_ratio"] = row[what]["output_throughput"] / row["api"]["output_throughput"]
        rounds.append(row)
        say(f"round {r}: api {row['api']['output_throughput']:.1f} tok/s (other CPU "
            f"{row['api']['foreign_cpu_pct']:.0f}%); " + "; ".join(
            f"{w} {row[w]['output_throughput']:.1f} tok/s = {row[w + '_ratio']:.3f}, stream ttft p50 "
            f"{row[w]['median_ttft_ms']:.0f} ms, batch e2e p50 {row[w + '_batch']['median_e2el_ms']:.0f} ms"
            for w in variants))
    med = statistics.median
    hv = {"clients": cl, "rounds": rounds, "variants": list(variants),
          "api_tok_s": med(r["api"]["output_throughput"] for r in rounds),
          "api_ttft_p50_ms": med(r["api"]["median_ttft_ms"] for r in rounds),
          "api_e2e_p50_ms": med(r["api"]["median_e2el_ms"] for r in rounds)}
    for w in variants:
        hv[w] = {"tok_s": med(r[w]["output_throughput"] for r in rounds),
                 "ratio": med(r[w + "_ratio"] for r in rounds),
                 "stream_ttft_p50_ms": med(r[w]["median_ttft_ms"] for r in rounds),
                 "stream_e2e_p50_ms": med(r[w]["median_e2el_ms"] for r in rounds),
                 "stream_tpot_p50_ms": med(r[w]["median_tpot_ms"] for r in rounds),
                 "batch_e2e_p50_ms": med(r[w + "_batch"]["median_e2el_ms"] for r in rounds),
                 "batch_tok_s": med(r[w + "_batch"]["output_throughput"] for r in rounds)}
        hv[w]["ttft_over_batch_e2e"] = hv[w]["stream_ttft_p50_ms"] / hv[w]["batch_e2e_p50_ms"]
    out["http_vs_api"] = hv

    # d. per-request overhead (one-token batch requests, one at a time) and memory
    one_tok = dataclass_replace(params, max_new_tokens=1)
    n = args.overhead_requests
    blocks: dict[str, list[float]] = {w: [] for w in [*variants, "api"]}
    server_e2e: dict[str, list[float]] = {w: [] for w in variants}
    for b in range(2):
        for what in blocks:
            if what != "api":
                f = load(n=n, concurrency=1, stream=False, max_tokens=1, prompt_len=16, srv=variants[what])
                blocks[what].append(f["mean_e2el_ms"])
                server_e2e[what].append(f["server_median_e2e_ms"])
                continue
            prompts = [pr.prompt for pr in synthetic_prompts(n, 16, next(seeds), "text")]

            async def seq():
                ts = []
                for text in prompts:
                    t = time.perf_counter()
                    await aengine.submit(text, one_tok).result()
                    ts.append((time.perf_counter() - t) * 1e3)
                return statistics.mean(ts)

            blocks["api"].append(asyncio.run(seq()))
    ov = {"requests_per_block": n, "prompt_len": 16, "max_tokens": 1, "blocks": blocks,
          "api_mean_e2e_ms": statistics.mean(blocks["api"])}
    for w in variants:
        ov[w] = {"mean_e2e_ms": statistics.mean(blocks[w]), "server_median_e2e_ms": statistics.mean(server_e2e[w])}
        ov[w]["minus_api_ms"] = ov[w]["mean_e2e_ms"] - ov["api_mean_e2e_ms"]
    out["overhead"] = ov
    say("overhead per 1-token request: api " + f"{ov['api_mean_e2e_ms']:.1f} ms; " +
        "; ".join(f"{w} {ov[w]['mean_e2e_ms']:.1f} ms" for w in variants))
    aengine.close()
    engine.close()

    time.sleep(2.0)
    rss["idle_after_load"] = server.rss_mib()
    rss["peak_hwm"] = server.hwm_mib()
    rss["peak_sampled"] = max((f["peak_rss_mib"] for f in closed + sweep), default=None)
    out["rss_mib"] = rss
    out["final_stats"] = server.stats()
    out["server_exit"] = server.stop()
    out["model_facts"] = {"weight_bytes": weight_bytes, "kv_bytes_per_token": kv_bytes_per_token,
                          "max_num_seqs": max_num_seqs}
    out["wall_s"] = time.perf_counter() - t_worker
    say(f"done in {out['wall_s']:.0f} s; rss {rss}")
    return out


def dataclass_replace(obj, **kw):
    import dataclasses

    return dataclasses.replace(obj, **kw)


# ----- the parent: reports and plots -----------------------------------------------------------
def run_worker(target: str, args, log_csv: Path) -> tuple[dict | None, str | None]:
    # the parent's own flags, less --targets and --out
    argv = sys.argv[1:]
    cleaned = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("--targets", "--out"):
            i += 2
            continue
        if a.startswith(("--targets=", "--out=")):
            i += 1
            continue
        cleaned.append(a)
        i += 1
    cmd = [sys.executable, __file__, "--worker", target, "--log-csv", str(log_csv), *cleaned]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=3600)  # stderr: live progress
    if proc.returncode != 0:
        return None, f"worker exited {proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def bound_tok_s(batch: int, gbps: float, weight_bytes: int) -> float:
    return batch * gbps * 1e9 / weight_bytes


def fmt(x, d=0):
    return "-" if x is None else f"{x:.{d}f}"


def markdown(rep: dict) -> str:
    s = rep["settings"]
    gbps = rep["copy_gbps"]
    lines = [f"# Serving: streaming vs batch over HTTP ({s['model']}, float32)", "",
             f"CPU: {rep['cpu']} ({rep['cpu_flags']}), {os.cpu_count()} cores; numpy copy bandwidth {gbps} GB/s. "
             f"Server: `mini-engine serve` in its own process on 127.0.0.1 (default config: max_num_seqs "
             f"{rep['rows'][0].get('model_facts', {}).get('max_num_seqs', '?') if rep['rows'] else '?'}, "
             f"max_num_batched_tokens 512, prefix caching on where the backend has it); the load generator "
             f"(mini_engine.bench.load_run, the `mini-engine load` code) in another process on the same 2 cores.",
             "", f"Command: `python {rep['command']}` ({rep['wall_s']:.0f} s)", "",
             f"Requests: {s['prompt_len']}-token text prompts (a fresh seed per run, so nothing is prefix-cached), "
             f"max_tokens {s['max_tokens']}, ignore_eos, temperature 0 (greedy).", ""]
    ok = [r for r in rep["rows"] if r.get("status") == "ok"]
    for r in ok:
        fp = [f["foreign_cpu_pct"] for f in timed_runs(r) if f.get("foreign_cpu_pct") is not None]
        if fp:
            lines.append(f"Other processes on the machine during {r['target']}'s timed runs (CPU not of the server, "
                         f"its variant or the worker, /proc/stat): median {statistics.median(fp):.0f}%, max "
                         f"{max(fp):.0f}% of one core.")
    lines.append("")
    for r in rep["rows"]:
        if r.get("status") != "ok":
            lines += [f"**{r['target']}: failed: {r.get('reason')}**", ""]
    # headline
    labels = {"http": "HTTP (mini-engine serve)"}
    lines += ["## Targets (part c: %d concurrent streaming clients x %d new tokens, medians of %d rounds)" %
              (s["clients"], s["max_tokens"], s["rounds"]), "",
              "tok/s = output tokens of the %d requests / wall time from the first send to the last answer. "
              "AsyncEngine: the same prompts and params submitted in the worker process (no HTTP). TTFT / batch "
              "e2e: p50 TTFT of the streaming clients over p50 e2e of the same load sent with stream false." %
              s["clients"], "",
              "| target | path | tok/s | AsyncEngine tok/s | HTTP / API (target >= 0.90) | stream TTFT p50 ms | "
              "stream TPOT p50 ms | batch e2e p50 ms | TTFT / batch e2e (target <= 0.25) | API TTFT p50 ms |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ok:
        h = r["http_vs_api"]
        for w in h["variants"]:
            v = h[w]
            lines.append(f"| {r['target']} | {labels[w]} | {v['tok_s']:.1f} | {h['api_tok_s']:.1f} | {v['ratio']:.3f} "
                         f"{'(met)' if v['ratio'] >= 0.9 else '(missed)'} | {v['stream_ttft_p50_ms']:.0f} | "
                         f"{fmt(v['stream_tpot_p50_ms'], 1)} | {v['batch_e2e_p50_ms']:.0f} | "
                         f"{v['ttft_over_batch_e2e']:.3f} {'(met)' if v['ttft_over_batch_e2e'] <= 0.25 else '(missed)'} "
                         f"| {h['api_ttft_p50_ms']:.0f} |")
    lines += ["", "Per round (the paths take turns going first):", "",
              "| target | round | order | API tok/s | path | tok/s | ratio | stream TTFT p50 | batch e2e p50 | "
              "other CPU % (API, path) |", "|---|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in ok:
        for i, rd in enumerate(r["http_vs_api"]["rounds"]):
            for w in r["http_vs_api"]["variants"]:
                lines.append(f"| {r['target']} | {i} | {rd['order']} | {rd['api']['output_throughput']:.1f} | "
                             f"{labels[w]} | {rd[w]['output_throughput']:.1f} | {rd[w + '_ratio']:.3f} | "
                             f"{rd[w]['median_ttft_ms']:.0f} | {rd[w + '_batch']['median_e2el_ms']:.0f} | "
                             f"{fmt(rd['api']['foreign_cpu_pct'])}, {fmt(rd[w]['foreign_cpu_pct'])} |")
    # closed loop
    lines += ["", "## a. Closed loop: streaming vs batch by concurrency", "",
              "TTFT of a batch request is its e2e (the whole answer is its first byte). TPOT = (e2e - TTFT) / "
              "(tokens - 1), streaming only. Server TTFT/e2e: the engine's own (request log), so client minus "
              "server is the HTTP path. Bound: B x copy bandwidth / weight bytes with B = min(C, max_num_seqs) "
              "(weights read once per decode step; KV reads and prefill ignored, so it is optimistic). "
              "Weight GB/s: decode+prefill steps x weight bytes / duration.", "",
              "| target | C | mode | n | TTFT p50 | TTFT p95 | e2e p50 | e2e p95 | TPOT p50 | out tok/s | req/s | "
              "server TTFT p50 | server e2e p50 | rows/step | weight GB/s | bound tok/s | of bound | peak RSS MiB | "
              "other CPU % |",
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ok:
        mf = r["model_facts"]
        for f in r["closed"]:
            b = min(f["concurrency"], mf["max_num_seqs"])
            bound = bound_tok_s(b, gbps, mf["weight_bytes"])
            wgbps = f["steps"] * mf["weight_bytes"] / f["duration"] / 1e9 if f["duration"] else None
            lines.append(
                f"| {r['target']} | {f['concurrency']} | {'stream' if f['stream'] else 'batch'} | {f['num_requests']} | "
                f"{fmt(f['median_ttft_ms'])} | {fmt(f['p95_ttft_ms'])} | {fmt(f['median_e2el_ms'])} | "
                f"{fmt(f['p95_e2el_ms'])} | {fmt(f['median_tpot_ms'], 1)} | {f['output_throughput']:.1f} | "
                f"{f['request_throughput']:.2f} | {fmt(f['server_median_ttft_ms'])} | {fmt(f['server_median_e2e_ms'])} "
                f"| {fmt(f['mean_rows_per_step'], 1)} | {fmt(wgbps, 1)} | {bound:.0f} | "
                f"{f['output_throughput'] / bound:.0%} | {f['peak_rss_mib']:.0f} | {fmt(f['foreign_cpu_pct'])} |")
    # rate sweep
    lines += ["", "## b. Open loop (Poisson arrivals, streaming)", "",
              "Rates are fractions of the best closed-loop streaming request rate (saturation) of the target.", "",
              "| target | rate req/s | x saturation | n | TTFT p50 | TTFT p95 | e2e p50 | e2e p95 | TPOT p50 | "
              "out tok/s | achieved req/s | server queue p50 ms | other CPU % |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ok:
        for f in r["rate_sweep"]["runs"]:
            lines.append(f"| {r['target']} | {f['rate']:.2f} | {f['fraction']:g} | {f['num_requests']} | "
                         f"{fmt(f['median_ttft_ms'])} | {fmt(f['p95_ttft_ms'])} | {fmt(f['median_e2el_ms'])} | "
                         f"{fmt(f['p95_e2el_ms'])} | {fmt(f['median_tpot_ms'], 1)} | {f['output_throughput']:.1f} | "
                         f"{f['request_throughput']:.2f} | {fmt(f['server_median_queue_ms'])} | "
                         f"{fmt(f['foreign_cpu_pct'])} |")
    # overhead and memory
    lines += ["", "## d. Per-request overhead and server memory", "",
              "One-token batch requests (16-token prompts), one at a time: mean e2e over HTTP (client-timed, "
              "`mini-engine load` code, one kept-alive connection) vs `await AsyncEngine.submit(...).result()` in "
              f"the worker; 2 blocks of {s['overhead_requests']} per path, interleaved. Server e2e: the engine's own "
              "time for the HTTP requests (request log).", "",
              "| target | path | HTTP mean e2e ms | API mean e2e ms | HTTP - API ms | server e2e p50 ms |",
              "|---|---|---:|---:|---:|---:|"]
    for r in ok:
        o = r["overhead"]
        for w in r["http_vs_api"]["variants"]:
            lines.append(f"| {r['target']} | {labels[w]} | {o[w]['mean_e2e_ms']:.1f} | {o['api_mean_e2e_ms']:.1f} | "
                         f"{o[w]['minus_api_ms']:.1f} | {fmt(o[w]['server_median_e2e_ms'], 1)} |")
    lines += ["", "| target | RSS after start | after warm-up | peak (VmHWM) | idle after load | "
              "idle after - after warm-up |", "|---|---:|---:|---:|---:|---:|"]
    for r in ok:
        m = r["rss_mib"]
        lines.append(f"| {r['target']} | {m['after_start']:.0f} | {m['after_warmup']:.0f} | {fmt(m['peak_hwm'])} | "
                     f"{m['idle_after_load']:.0f} | {m['idle_after_load'] - m['after_warmup']:+.0f} |")
    lines += ["", "RSS in MiB of the server process (psutil on its pid; VmHWM from /proc/PID/status).", ""]
    for r in ok:
        fs = r["final_stats"]
        lines.append(f"- {r['target']}: server `{r['server_cmd']}`; worker {r['wall_s']:.0f} s; at the end /stats "
                     f"running {fs['running']}, waiting {fs['waiting']}, kv_usage {fs['kv_usage']}, admitted "
                     f"{fs['admitted']}; server exit code {r['server_exit']}; "
                     f"{'; '.join(n for n in r['server_notes'])}")
    lines += ["", "Plots: serving_latency.png (TTFT/e2e vs concurrency), serving_throughput.png, "
              "serving_rate_sweep.png. Request logs: logs/<backend>_requests.csv; "
              "`mini-engine analyze` of the first target's log: analyze/.", ""]
    return "\n".join(lines)


def timed_runs(r: dict) -> list[dict]:
    runs = list(r["closed"]) + list(r["rate_sweep"]["runs"])
    for rd in r["http_vs_api"]["rounds"]:
        runs += [v for k, v in rd.items() if isinstance(v, dict)]
    return runs


def plots(rep: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rep["rows"] if r.get("status") == "ok"]
    if not ok or not all(r["closed"] for r in ok):
        return []
    written = []
    title = f"{rep['settings']['model']}, {rep['cpu']}"
    fig, axes = plt.subplots(1, len(ok), figsize=(6 * len(ok), 4.5), squeeze=False)
    for ax, r in zip(axes[0], ok):
        st = sorted((f for f in r["closed"] if f["stream"]), key=lambda f: f["concurrency"])
        bt = sorted((f for f in r["closed"] if not f["stream"]), key=lambda f: f["concurrency"])
        cs = [f["concurrency"] for f in st]
        ax.plot(cs, [f["median_ttft_ms"] for f in st], "o-", label="stream TTFT p50")
        ax.plot(cs, [f["p95_ttft_ms"] for f in st], "o:", color="C0", alpha=0.6, label="stream TTFT p95")
        ax.plot(cs, [f["median_e2el_ms"] for f in st], "s-", color="C2", label="stream e2e p50")
        ax.plot([f["concurrency"] for f in bt], [f["median_e2el_ms"] for f in bt], "^-", color="C3",
                label="batch e2e (= its TTFT) p50")
        ax.plot([f["concurrency"] for f in bt], [f["p95_e2el_ms"] for f in bt], "^:", color="C3", alpha=0.6,
                label="batch e2e p95")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel("ms")
        ax.set_title(r["target"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"TTFT and e2e latency vs concurrency: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "serving_latency.png", dpi=110)
    plt.close(fig)
    written.append("serving_latency.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(ok):
        for stream, mk in ((True, "o-"), (False, "^--")):
            fs = sorted((f for f in r["closed"] if f["stream"] == stream), key=lambda f: f["concurrency"])
            ax.plot([f["concurrency"] for f in fs], [f["output_throughput"] for f in fs], mk, color=f"C{i}",
                    label=f"{r['target']} {'stream' if stream else 'batch'}")
        mf = r["model_facts"]
        cs = sorted({f["concurrency"] for f in r["closed"]})
        if i == 0:
            ax.plot(cs, [bound_tok_s(min(c, mf["max_num_seqs"]), rep["copy_gbps"], mf["weight_bytes"]) for c in cs],
                    ":", color="gray", label="weight-bandwidth bound")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent clients (closed loop)")
    ax.set_ylabel("output tokens/s (client)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Throughput vs concurrency: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "serving_throughput.png", dpi=110)
    plt.close(fig)
    written.append("serving_throughput.png")

    if not all(r["rate_sweep"]["runs"] for r in ok):
        return written
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, r in enumerate(ok):
        runs = r["rate_sweep"]["runs"]
        x = [f["rate"] for f in runs]
        axes[0].plot(x, [f["median_ttft_ms"] for f in runs], "o-", color=f"C{i}", label=f"{r['target']} TTFT p50")
        axes[0].plot(x, [f["p95_ttft_ms"] for f in runs], "o:", color=f"C{i}", alpha=0.6,
                     label=f"{r['target']} TTFT p95")
        axes[1].plot(x, [f["median_e2el_ms"] for f in runs], "s-", color=f"C{i}", label=f"{r['target']} e2e p50")
        axes[1].plot(x, [f["p95_e2el_ms"] for f in runs], "s:", color=f"C{i}", alpha=0.6,
                     label=f"{r['target']} e2e p95")
        sat = r["rate_sweep"]["saturation_req_s"]
        for ax in axes:
            ax.axvline(sat, color=f"C{i}", ls="--", alpha=0.3)
    for ax, what in zip(axes, ("TTFT", "e2e")):
        ax.set_xlabel("request rate (Poisson, req/s); dashed: closed-loop saturation")
        ax.set_ylabel(f"{what} ms (streaming)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Open-loop rate sweep: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_dir / "serving_rate_sweep.png", dpi=110)
    plt.close(fig)
    written.append("serving_rate_sweep.png")
    return written


def cpu_flags() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return "flags unknown"
    avx512 = sorted({f for f in flags.split() if f.startswith("avx512")})
    return ("avx512: " + " ".join(avx512)) if avx512 else "no avx512"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args), default=str))
        return 0
    out = Path(args.out)
    out_dir = out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    t = time.perf_counter()
    gbps = copy_bandwidth_gbps()
    rows, logs = [], []
    for target in args.targets.split(","):
        log_csv = out_dir / "logs" / f"{target.replace(':', '_')}_requests.csv"
        got, reason = run_worker(target, args, log_csv)
        rows.append(got if reason is None else {"target": target, "status": "failed", "reason": reason})
        logs.append(log_csv)
    rep = {"command": command_line(), "cpu": cpu_model(), "cpu_flags": cpu_flags(), "copy_gbps": gbps,
           "wall_s": time.perf_counter() - t,
           "settings": {k: getattr(args, k) for k in ("model", "targets", "concurrency", "num_requests", "prompt_len",
                                                      "max_tokens", "rate_fractions", "rate_requests", "clients",
                                                      "rounds", "overhead_requests", "quick", "parts")},
           "rows": rows}
    rep["plots"] = plots(rep, out_dir)
    if not args.no_analyze and logs and logs[0].exists():
        proc = subprocess.run([sys.executable, "-m", "mini_engine", "analyze", str(logs[0]), "--out",
                               str(out_dir / "analyze")], capture_output=True, text=True, cwd=ROOT)
        rep["analyze"] = {"log": str(logs[0]), "rc": proc.returncode, "table": proc.stdout}
    write_report(str(out), rep, markdown(rep))
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
