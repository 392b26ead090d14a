#!/usr/bin/env python
"""Soak test of the HTTP server: --minutes of mixed load against one `mini-engine serve` process on
127.0.0.1, then checks that it served, that it went back to idle and that its memory stayed flat.

The load (--clients closed-loop workers, each picking its next request at random, seeded):
- /v1/completions streaming and batch, prompts of 8-384 tokens, max_tokens 1-96, ignore_eos mostly
  (answers checked: a 200 with ignore_eos must carry exactly max_tokens tokens);
- /generate and /generate/stream (the native endpoints);
- clients that go away: a stream closed after a few events, a batch request given up on after
  0.3 s (the server should abort both and free their KV: 499 in its log);
- malformed bodies: bad JSON, a missing prompt, max_tokens -1, an unknown model, token ids out of the
  vocabulary, a prompt longer than the window, a body over server.max_body_bytes (each must get its
  4xx, never a 5xx).
- hostile requests: a negative seed, a denormal temperature (both served), a lone surrogate in the
  prompt, more prompts than server.max_prompts_per_request (both 400).
Bounded: the run stops sending at --minutes or --max-requests, whichever comes first, and every
request has a timeout. Every second the server's RSS (psutil on its pid) is sampled and every 5 s
its /stats. Criteria (issue "reliability under hostile input and long load"): nothing lost (every
request the engine admitted has its row in the server's request log, and every error the clients
saw is counted in /metrics by status), /stats back to idle with KV usage 0, and memory flat: RSS at
the end within +10 % of the RSS a quarter into the run, and within +5 % of the RSS at half time.

    python benchmarks/soak.py --minutes 30 --backend torch --out result/cpu/soak/torch/soak
    python benchmarks/soak.py --quick        # random:tiny, 20 s
    python benchmarks/soak.py --shape-probe --out result/cpu/soak/shape_probe

--shape-probe tells a leak from a cost per step shape without HTTP: one Engine per backend in a fresh
interpreter, one request per distinct prompt length (--probe-lengths), RSS growth per quarter of the
lengths and on repeated lengths, and tracemalloc's count of Python memory left over.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import command_line, cpu_model, write_report  # noqa: E402
from serving_bench import ServerProcess, cpu_flags, read_log_rows  # noqa: E402

QUARTER_TO_END = 0.10  # RSS growth allowed from a quarter into the run to its end
HALF_TO_END = 0.05  # and over the second half
KINDS = {"stream": 34, "batch": 26, "generate": 8, "generate_stream": 8, "disconnect_stream": 7,
         "disconnect_batch": 5, "malformed": 12}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="[random:gpt2; --quick: random:tiny]")
    p.add_argument("--backend", default="torch")
    p.add_argument("--minutes", type=float, default=None, help="[30; --quick: 0.33]")
    p.add_argument("--max-requests", type=int, default=20000, help="stop sending after this many [20000]")
    p.add_argument("--clients", type=int, default=16, help="concurrent closed-loop workers [16]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--shape-probe", action="store_true", help="RSS vs distinct prompt lengths, in-process, per backend")
    p.add_argument("--probe-targets", default="torch,onnxruntime")
    p.add_argument("--probe-lengths", default="5:1000:5", help="start:stop:step of the prompt lengths [5:1000:5]")
    p.add_argument("--probe-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="[result/cpu/soak/soak; --quick: /tmp/soak_quick/soak]")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "random:tiny" if args.quick else "random:gpt2"
    if args.minutes is None:
        args.minutes = 0.33 if args.quick else 30.0
    if args.out is None:
        args.out = ("/tmp/soak_quick/soak" if args.quick else
                    "result/cpu/soak/shape_probe" if args.shape_probe else "result/cpu/soak/soak")
    return args


def words(rng: random.Random, n: int) -> str:
    from mini_engine.bench.workload import _WORDS

    return "".join(" " + rng.choice(_WORDS) for _ in range(n))


class Tally:
    def __init__(self):
        self.by_kind: dict[str, dict[str, int]] = {}
        self.problems: list[str] = []  # unexpected outcomes (first 20)
        self.sent = 0
        self.tokens = 0
        self.admitted = 0  # requests that reached the engine: each must have a row in the server's log
        self.error_statuses: dict[str, int] = {}  # error answers the clients saw, by HTTP status

    def add(self, kind: str, outcome: str, problem: str | None = None) -> None:
        d = self.by_kind.setdefault(kind, {})
        d[outcome] = d.get(outcome, 0) + 1
        if problem and len(self.problems) < 20:
            self.problems.append(f"{kind}: {problem}")


async def soak(args, server: ServerProcess, model: str, window: int) -> dict:
    import httpx

    from mini_engine.bench.load_client import RequestRecord, request_body, send

    url = server.url
    rng_master = random.Random(args.seed)
    tally = Tally()
    t0 = time.perf_counter()
    stop_at = t0 + args.minutes * 60
    rss_series: list[tuple[float, float]] = []
    stats_series: list[dict] = []
    kinds, weights = zip(*KINDS.items())

    async def sample():
        i = 0
        while time.perf_counter() < stop_at:
            rss_series.append((time.perf_counter() - t0, server.rss_mib()))
            if i % 5 == 0:
                try:
                    r = await stats_client.get(f"{url}/stats")
                    stats_series.append({"t": time.perf_counter() - t0} | r.json())
                except httpx.HTTPError:
                    pass
            i += 1
            await asyncio.sleep(1.0)

    async def malformed(client, rng):
        cases = [
            ("bad_json", b'{"prompt": "hello", "max_tokens": ', (400, 422)),
            ("no_prompt", json.dumps({"model": model, "max_tokens": 4}).encode(), (400, 422)),
            ("negative_max_tokens", json.dumps({"model": model, "prompt": "hi", "max_tokens": -1}).encode(),
             (400, 422)),
            ("unknown_model", json.dumps({"model": "no-such-model", "prompt": "hi", "max_tokens": 2}).encode(),
             (404,)),
            ("ids_out_of_vocab", json.dumps({"model": model, "prompt": [10**9, 5], "max_tokens": 2}).encode(),
             (400, 422)),
            ("over_window", json.dumps({"model": model, "prompt": [7] * 5000, "max_tokens": 2}).encode(), (400,)),
            ("body_too_large", b'{"prompt": "' + b"a" * (1 << 20) + b'"}', (413,)),
            ("not_json", b"hello there", (400, 422)),
            ("negative_seed", json.dumps({"prompt": "hi", "max_tokens": 4, "temperature": 1.0, "seed": -1}).encode(),
             (200,)),
            ("denormal_temperature", json.dumps({"prompt": "hi", "max_tokens": 4, "temperature": 5e-324}).encode(),
             (200,)),
            ("lone_surrogate", json.dumps({"prompt": "a\ud800b", "max_tokens": 2}).encode(), (400,)),
            ("too_many_prompts", json.dumps({"prompt": [[5] * 8] * 300, "max_tokens": 2}).encode(), (400,)),
        ]
        name, body, expected = cases[rng.randrange(len(cases))]
        r = await client.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
        ok = r.status_code in expected
        if r.status_code >= 400:
            tally.error_statuses[str(r.status_code)] = tally.error_statuses.get(str(r.status_code), 0) + 1
        else:
            tally.admitted += 1
        tally.add("malformed", f"{name}:{r.status_code}", None if ok else
                  f"{name} answered {r.status_code} (expected {expected}): {r.text[:120]}")

    async def one(client, rng, kind):
        max_tokens = rng.choice([1, 4, 16, 32, 64, 96])
        prompt_len = rng.choice([n for n in (8, 16, 32, 64, 128, 256, 384) if n + 96 <= window] or [8])
        ignore_eos = rng.random() < 0.8
        prompt = words(rng, prompt_len)
        if kind in ("stream", "batch"):
            body = request_body(model, prompt, max_tokens, kind == "stream", ignore_eos,
                                0.0 if rng.random() < 0.7 else 0.8)
            rec = await send(client, f"{url}/v1/completions", body, RequestRecord(0, stream=kind == "stream"), t0,
                             120.0, prompt_len)
            if rec.ok:
                tally.tokens += rec.output_tokens
                bad = ignore_eos and rec.output_tokens != max_tokens
                tally.add(kind, "ok" if not bad else "wrong_length",
                          f"{rec.output_tokens} tokens for max_tokens {max_tokens}" if bad else None)
            else:
                tally.add(kind, rec.error_kind, rec.error)
        elif kind in ("generate", "generate_stream"):
            body = {"prompt": prompt, "max_new_tokens": max_tokens, "ignore_eos": ignore_eos}
            path = "/generate" if kind == "generate" else "/generate/stream"
            async with client.stream("POST", f"{url}{path}", json=body) as r:
                text = (await r.aread()).decode("utf-8", "replace")
            if r.status_code == 200 and '"error"' not in text:
                tally.add(kind, "ok")
            else:
                tally.add(kind, f"http_{r.status_code}", text[:160])
        elif kind == "disconnect_stream":
            body = request_body(model, prompt, 64, True, True, 0.0)
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        seen += 1
                        if seen >= rng.choice([1, 2, 4]):
                            break  # leaving the block closes the connection mid-stream
            tally.add(kind, "closed" if r.status_code == 200 else f"http_{r.status_code}")
        elif kind == "disconnect_batch":
            body = request_body(model, prompt, 96, False, True, 0.0)
            try:
                r = await client.post(f"{url}/v1/completions", json=body, timeout=0.3)
                tally.add(kind, f"answered_{r.status_code}")  # done within 0.3 s: nothing to abort
            except httpx.TimeoutException:
                tally.add(kind, "gave_up")
        else:
            await malformed(client, rng)

    async def worker(w: int):
        rng = random.Random(rng_master.random())
        async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), trust_env=False) as client:
            while time.perf_counter() < stop_at and tally.sent < args.max_requests:
                kind = rng.choices(kinds, weights)[0]
                tally.sent += 1
                if kind != "malformed":
                    tally.admitted += 1
                try:
                    await one(client, rng, kind)
                except httpx.HTTPError as e:
                    tally.add(kind, f"client_{type(e).__name__}", f"{type(e).__name__}: {e}")

    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as stats_client:
        sampler = asyncio.ensure_future(sample())
        await asyncio.gather(*(worker(w) for w in range(args.clients)))
        sent_s = time.perf_counter() - t0
        await sampler
    return {"tally": tally, "rss_series": rss_series, "stats_series": stats_series, "sent_s": sent_s}


WARMUP_REQUESTS = 16


def git_commit() -> str:
    """The checkout's commit, with "+changes" when its tracked files differ from it."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def read_error_metrics(url: str) -> dict[str, float]:
    """mini_engine:request_errors_total by status, from /metrics."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", trust_env=False).text.splitlines():
        if line.startswith("mini_engine:request_errors_total{") and 'status="' in line:
            out[line.split('status="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def markdown(rep: dict) -> str:
    m, f = rep["rss_mib"], rep["final_stats"]
    lines = [f"# Soak: {rep['minutes']:g} minutes of mixed load, {rep['model']} on {rep['backend']}", "",
             f"CPU: {rep['cpu']} ({rep['cpu_flags']}); commit {rep.get('commit', '?')}. "
             f"Server: `{rep['server_cmd']}` (its own process, 127.0.0.1), "
             f"{rep['clients']} closed-loop client workers in another process.", "",
             f"Command: `python {rep['command']}`", "",
             f"Requests sent: {rep['sent']} in {rep['sent_s']:.0f} s ({rep['sent'] / rep['sent_s']:.2f} req/s); "
             f"output tokens received {rep['tokens']}; served per the server's request log: {rep['log']['rows']} "
             f"rows, by status {rep['log']['by_status']}.", "",
             "| kind | outcomes |", "|---|---|"]
    for kind, d in sorted(rep["by_kind"].items()):
        lines.append(f"| {kind} | " + ", ".join(f"{k}: {v}" for k, v in sorted(d.items())) + " |")
    lines += ["", f"Unexpected outcomes: {len(rep['problems'])}" + (":" if rep["problems"] else " (none)")]
    lines += [f"- {p}" for p in rep["problems"]]
    lines += ["", f"Nothing lost: {rep['admitted']} requests reached the engine during the soak, plus "
              f"{WARMUP_REQUESTS} of warm-up: {rep['expected_log_rows']} rows expected in the request log, "
              f"{rep['log']['rows']} found: **{'pass' if rep['nothing_lost'] else 'FAIL'}**. Errors the clients saw, "
              f"by status: {rep['client_error_statuses']}; counted in /metrics: {rep['metrics_error_statuses']} "
              f"(499s: clients that left; the log has {rep['log']['by_status'].get('499', 0)}): "
              f"**{'pass' if rep['errors_ok'] else 'FAIL'}**.", "",
              "## Memory (server RSS, MiB)", "",
              "| after start | after warm-up (start of soak) | at 1/4 of the run | at 1/2 | max | end (idle) | "
              "end / 1/4 | end / 1/2 |", "|---:|---:|---:|---:|---:|---:|---:|---:|",
              f"| {m['after_start']:.0f} | {m['start']:.0f} | {m['quarter']:.0f} | {m['half']:.0f} | {m['max']:.0f} | "
              f"{m['end']:.0f} | {m['end'] / m['quarter'] - 1:+.1%} | {m['end'] / m['half'] - 1:+.1%} |", "",
              f"Criterion: end within +{QUARTER_TO_END:.0%} of the RSS at 1/4 of the run and within "
              f"+{HALF_TO_END:.0%} of the RSS at 1/2: **{'pass' if rep['memory_ok'] else 'FAIL'}**. "
              f"({rep['kv_capacity']}.)", "",
              "## Back to idle", "",
              f"/stats {rep['idle_after_s']:.1f} s after the last request: running {f['running']}, waiting "
              f"{f['waiting']}, kv_usage {f['kv_usage']}, admitted {f['admitted']}, in_flight {f.get('in_flight')}, "
              f"alive {f['alive']}; peak kv_usage during the run {rep['peak_kv_usage']:.3f}, preemptions "
              f"{f.get('preemptions')}: **{'pass' if rep['idle_ok'] else 'FAIL'}**. Server exit code on SIGTERM: "
              f"{rep['server_exit']}.", ""]
    return "\n".join(lines)


def probe_worker(args) -> dict:
    """One request per distinct prompt length on an in-process Engine: RSS and Python memory growth."""
    import gc
    import tracemalloc

    import psutil

    from mini_engine import Engine
    from mini_engine.sampling import SamplingParams

    proc = psutil.Process()
    engine = Engine(model=args.model, backend=args.probe_worker)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)

    def run(ids):
        engine.add_request(None, ids, params)
        while engine.has_unfinished_requests():
            engine.step()

    run([5] * 8)
    for _ in range(3):
        run([6] * 8)  # a repeated shape: no growth expected
    a, b, c = (int(x) for x in args.probe_lengths.split(":"))
    lengths = list(range(a, b, c))
    tracemalloc.start()
    rss0 = proc.memory_info().rss / 2**20
    series = []
    for n in lengths:
        run([(7 * i + n) % 5000 for i in range(n)])
        series.append((n, round(proc.memory_info().rss / 2**20, 1)))
    repeat0 = proc.memory_info().rss / 2**20
    for n in lengths[: len(lengths) // 2]:
        run([(11 * i + n) % 5000 for i in range(n)])  # the same lengths again, other tokens
    gc.collect()
    rss1 = proc.memory_info().rss / 2**20
    traced = tracemalloc.get_traced_memory()[0] / 2**20
    engine.close()
    return {"target": args.probe_worker, "lengths": len(lengths), "rss_before": rss0, "rss_after_new": repeat0,
            "rss_after_repeat": rss1, "per_new_length_mib": (repeat0 - rss0) / len(lengths),
            "python_traced_mib": traced, "series": series}


def shape_probe(args) -> int:
    import subprocess

    rows = []
    for target in args.probe_targets.split(","):
        proc = subprocess.run([sys.executable, __file__, "--probe-worker", target, "--model", args.model,
                               "--probe-lengths", args.probe_lengths], capture_output=True, text=True, timeout=1800)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                    {"target": target, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
    lines = [f"# Server RSS vs step shapes: {args.model}, in-process Engine, no HTTP", "",
             f"CPU: {cpu_model()} ({cpu_flags()}); commit {git_commit()}. One 2-token request per distinct prompt length "
             f"{args.probe_lengths} (start:stop:step), one at a time, then half of the lengths again with other tokens.",
             "", f"Command: `python {command_line()}`", "",
             "| target | distinct lengths | RSS before MiB | after the new lengths | after repeating lengths | "
             "growth over the 1st / 2nd / 3rd / 4th quarter of the lengths MiB | "
             "Python memory left (tracemalloc) MiB |", "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['target']} | failed: {r['error']} | | | | | |")
            continue
        rss = [r["rss_before"]] + [x for _, x in r["series"]]
        q = [rss[min(len(rss) - 1, round(i * (len(rss) - 1) / 4))] for i in range(5)]
        quarters = " / ".join(f"{b - a:+.0f}" for a, b in zip(q, q[1:]))
        lines.append(f"| {r['target']} | {r['lengths']} | {r['rss_before']:.0f} | {r['rss_after_new']:.0f} | "
                     f"{r['rss_after_repeat']:.0f} | {quarters} | {r['python_traced_mib']:.2f} |")
    lines += ["", "A per-request leak would grow alike in every quarter and again on repeated lengths; a cost per "
              "step shape grows only with new shapes; a bounded one (the torch backend's bucketed oneDNN row "
              "counts, backends/pytorch/linears.py) shrinks quarter by quarter as the buckets fill.", ""]
    write_report(args.out, {"command": command_line(), "cpu": cpu_model(), "cpu_flags": cpu_flags(),
                            "model": args.model, "lengths": args.probe_lengths, "rows": rows}, "\n".join(lines))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import mini_engine  # noqa: F401 - first: OpenBLAS's thread timeout

    if args.probe_worker:
        print(json.dumps(probe_worker(args)))
        return 0
    if args.shape_probe:
        return shape_probe(args)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_csv = str(out.parent / "requests.csv")
    server = ServerProcess(args.model, args.backend, log_csv=log_csv, stderr_path=str(out.parent / "server.log"))
    print(f"server {server.url} pid {server.pid}", file=sys.stderr, flush=True)
    try:
        after_start = server.rss_mib()
        import httpx

        card = httpx.get(f"{server.url}/v1/models", trust_env=False).json()["data"][0]
        model, window = card["id"], card["max_model_len"]
        # warm-up: a burst at full batch, so the start figure is of a warm server
        from mini_engine.bench.load_run import LoadConfig, run_load

        run_load(LoadConfig(url=server.url, num_requests=WARMUP_REQUESTS, concurrency=16, prompt_len=64, max_tokens=8,
                            ignore_eos=True, seed=12345))
        server.wait_idle()
        start_rss = server.rss_mib()
        res = asyncio.run(soak(args, server, model, window))
        t_idle = time.perf_counter()
        try:
            final = server.wait_idle(120.0)
            idle_ok = True
        except RuntimeError:
            final, idle_ok = server.stats(), False
        idle_after_s = time.perf_counter() - t_idle
        time.sleep(2.0)
        end_rss = server.rss_mib()
        hwm = server.hwm_mib()
        metrics_errors = read_error_metrics(server.url)
    finally:
        exit_code = server.stop()
    series = res["rss_series"]

    def rss_at(fraction: float) -> float:
        return next((r for t, r in series if t >= res["sent_s"] * fraction), series[-1][1] if series else end_rss)

    quarter, half = rss_at(0.25), rss_at(0.5)
    tally = res["tally"]
    rows = read_log_rows(log_csv, 0, 0)
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    # Every error the clients saw is counted by status in /metrics; every 499 the server logged too.
    counted = {k: int(v) for k, v in metrics_errors.items()}
    errors_ok = all(counted.get(k, 0) == n for k, n in tally.error_statuses.items()) and \
        counted.get("499", 0) == by_status.get("499", 0)
    expected_rows = WARMUP_REQUESTS + tally.admitted
    idle_ok = idle_ok and final["running"] == 0 and final["waiting"] == 0 and final["kv_usage"] == 0 \
        and final["admitted"] == 0
    notes = [ln[6:] for ln in server.lines if ln.startswith("note: KV")]
    rep = {"command": command_line(), "cpu": cpu_model(), "cpu_flags": cpu_flags(), "commit": git_commit(),
           "model": args.model,
           "backend": args.backend, "minutes": args.minutes, "clients": args.clients, "seed": args.seed,
           "server_cmd": " ".join(server.cmd[1:]), "sent": tally.sent, "sent_s": res["sent_s"],
           "tokens": tally.tokens, "by_kind": tally.by_kind, "problems": tally.problems,
           "log": {"rows": len(rows), "by_status": dict(sorted(by_status.items()))},
           "rss_mib": {"after_start": after_start, "start": start_rss, "quarter": quarter, "half": half,
                       "max": max([r for _, r in series] + [end_rss, start_rss]), "end": end_rss, "hwm": hwm},
           "memory_ok": end_rss <= quarter * (1 + QUARTER_TO_END) and end_rss <= half * (1 + HALF_TO_END),
           "admitted": tally.admitted, "expected_log_rows": expected_rows,
           "nothing_lost": len(rows) == expected_rows, "client_error_statuses": tally.error_statuses,
           "metrics_error_statuses": counted, "errors_ok": errors_ok,
           "final_stats": final, "idle_ok": idle_ok, "idle_after_s": idle_after_s,
           "peak_kv_usage": max([s.get("kv_usage", 0) for s in res["stats_series"]] + [final.get("peak_kv_usage", 0)]),
           "kv_capacity": notes[0] if notes else "", "server_exit": exit_code,
           "rss_series": [(round(t, 1), round(r, 1)) for t, r in series], "stats_series": res["stats_series"]}
    write_report(str(out), rep, markdown(rep))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot([t for t, _ in series], [r for _, r in series], label="server RSS MiB")
        ax.axhline(quarter * (1 + QUARTER_TO_END), color="gray", ls=":",
                   label=f"RSS at 1/4 of the run + {QUARTER_TO_END:.0%}")
        ax.set_xlabel("s")
        ax.set_ylabel("MiB")
        ax2 = ax.twinx()
        ss = res["stats_series"]
        ax2.plot([s["t"] for s in ss], [s["running"] + s["waiting"] for s in ss], color="C1", alpha=0.6,
                 label="running + waiting")
        ax2.set_ylabel("requests")
        fig.legend(fontsize=8, loc="lower right")
        ax.set_title(f"soak: {args.model} {args.backend}, {cpu_model()}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out.parent / "soak_rss.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    return 0 if rep["memory_ok"] and rep["idle_ok"] and rep["nothing_lost"] and rep["errors_ok"] \
        and not tally.problems else 1


if __name__ == "__main__":
    sys.exit(main())
