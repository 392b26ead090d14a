#!/usr/bin/env python
"""`mini-engine load` against Ray Serve replicas (1 vs 2) and the plain `mini-engine serve`.

Per round, each target is started fresh as its own process on 127.0.0.1 (a free port), gets a
short warm-up load, then the measured loads, then SIGTERM (and, for Ray, a check that the
cluster's processes are gone before the next target starts). The order of the targets
alternates from round to round. Targets:

  plain  `mini-engine serve` (one process; torch's default threads = the 2 cores)
  ray1   `mini-engine serve --ray --replicas 1 --set ray.num_cpus_per_replica=2`: one replica
         with both cores (Ray sets OMP_NUM_THREADS=2), behind Ray Serve's proxy
  ray2   `mini-engine serve --ray --replicas 2` (1 CPU each, OMP_NUM_THREADS=1 each)

Loads (the same request set for every target: same seed, prompt length, max_tokens):
  c1   --concurrency 1, short answers: the per-request cost of the proxy hop
  c8   --concurrency 8, streaming (SSE): the throughput comparison
  c8b  the same requests without streaming (one answer per request): what the proxy costs per
       request rather than per streamed token

    flock /tmp/mini-bench.lock python benchmarks/ray_bench.py --out result/cpu/ray/ray_bench
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import command_line, cpu_model, uptime, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MINI = [sys.executable, "-m", "mini_engine"]
TARGETS = {
    "plain": ["serve"],
    "ray1": ["serve", "--ray", "--replicas", "1", "--set", "ray.num_cpus_per_replica=2"],
    "ray2": ["serve", "--ray", "--replicas", "2"],
}
KEYS = ("output_throughput", "request_throughput", "median_ttft_ms", "p95_ttft_ms", "median_e2el_ms",
        "p95_e2el_ms", "median_tpot_ms", "completed", "failed", "duration")
LOADS = ("c8", "c8b", "c1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="random:gpt2")
    p.add_argument("--targets", default="plain,ray1,ray2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-requests", type=int, default=48, help="requests of the c8 load [48]")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--c1-requests", type=int, default=12, help="requests of the c1 load (max_tokens 4) [12]")
    p.add_argument("--out", default=None, help="OUT.json and OUT.md")
    p.add_argument("--from-rows", default=None, help="rebuild the report from the JSON rows a run printed")
    p.add_argument("--rows-command", default="", help="with --from-rows: the command that printed them")
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Target:
    def __init__(self, name: str, model: str, log: Path):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = log.open("w")
        cmd = [*MINI, *TARGETS[name], "--model", model, "--port", str(self.port),
               "--set", "server.shutdown_grace_s=5"]
        self.cmd = " ".join(["mini-engine", *cmd[3:]])
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.log = log
        deadline = time.monotonic() + 240
        while "mini-engine: serving" not in log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise SystemExit(f"{name} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        try:
            self.tree = {p.pid: p.create_time() for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except BaseException:
            self.proc.kill()
            raise

    def stop(self) -> None:
        self.tree |= {p.pid: p.create_time() for p in psutil.Process(self.proc.pid).children(recursive=True)}
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        deadline = time.monotonic() + 30
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.alive():
            raise SystemExit(f"{self.name}: processes left after stop: {self.alive()}")
        self.out.close()

    def alive(self) -> list[int]:
        left = []
        for pid, t in self.tree.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == t and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                pass
        return left


def load(url: str, args, n: int, concurrency: int, max_tokens: int, seed: int, tmp: Path,
         stream: bool = True) -> tuple[dict, str]:
    out = tmp / f"load-{time.monotonic_ns()}"
    cmd = ["load", "--url", url, "-n", str(n), "--concurrency", str(concurrency), "--prompt-len",
           str(args.prompt_len), "--max-tokens", str(max_tokens), "--ignore-eos", "--seed", str(seed),
           "--stream" if stream else "--no-stream", "--timeout-s", "120", "--deadline-s", "600", "-q",
           "--out", str(out)]
    proc = subprocess.run([*MINI, *cmd], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"load failed: {proc.stderr[-2000:]}")
    summary = json.loads((out / "load.json").read_text())["summary"]
    return {k: summary.get(k) for k in KEYS}, "mini-engine " + " ".join(cmd[:-2])


def _exit_on_sigterm(signum, frame):
    raise SystemExit(143)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.from_rows:
        return from_rows(args)
    # SIGTERM (a timeout) still stops the running target in its `finally`: servers run in their own sessions.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    names = args.targets.split(",")
    report = {"command": command_line(), "cpu": cpu_model(), "cores": os.cpu_count(), "model": args.model,
              "uptime_before": uptime(), "runs": [], "load_commands": {}, "target_commands": {}}
    tmp = Path(tempfile.mkdtemp(prefix="ray_bench-"))
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t = Target(name, args.model, tmp / f"{name}-{r}.log")
            report["target_commands"][name] = t.cmd
            try:
                load(t.url, args, 8, args.concurrency, 8, seed=1000 + r, tmp=tmp)  # warm-up, other prompts
                row = {"round": r, "target": name, "uptime": uptime()}
                row["c1"], report["load_commands"]["c1"] = load(t.url, args, args.c1_requests, 1, 4, seed=7, tmp=tmp)
                row["c8"], report["load_commands"]["c8"] = load(t.url, args, args.num_requests, args.concurrency,
                                                                args.max_tokens, seed=11, tmp=tmp)
                row["c8b"], report["load_commands"]["c8b"] = load(t.url, args, args.num_requests, args.concurrency,
                                                                  args.max_tokens, seed=11, tmp=tmp, stream=False)
            finally:
                t.stop()
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
    report["uptime_after"] = uptime()
    finish(args, report, names)


def finish(args, report: dict, names: list[str]) -> None:
    report["median"] = {name: {load_name: {k: _median([run[load_name][k] for run in report["runs"]
                                                       if run["target"] == name])
                                           for k in KEYS if k not in ("completed", "failed")}
                               for load_name in LOADS} for name in names}
    write_report(args.out, report, markdown(report, names))


def _median(values: list):
    values = [v for v in values if v is not None]  # TPOT of a non-streaming load is None
    return statistics.median(values) if values else None


def from_rows(args) -> None:
    """Rebuild the report from the JSON rows a run printed (one per target and round)."""
    rows = [json.loads(line) for line in Path(args.from_rows).read_text().splitlines() if line.startswith("{")]
    names = list(dict.fromkeys(r["target"] for r in rows))
    report = {"command": f"{args.rows_command}; report rebuilt from the rows it printed by "
                         f"`benchmarks/ray_bench.py --from-rows {args.from_rows} --out {args.out}`", "cpu": cpu_model(),
              "cores": os.cpu_count(), "model": args.model, "uptime_before": rows[0]["uptime"] + " (first row)",
              "uptime_after": rows[-1]["uptime"] + " (last row)", "runs": rows,
              "load_commands": {}, "target_commands": {n: " ".join(["mini-engine", *TARGETS[n], "--model", args.model,
                                                                    "--port", "PORT", "--set",
                                                                    "server.shutdown_grace_s=5"]) for n in names}}
    for name, (n, c, k, seed, stream) in {"c8": (args.num_requests, args.concurrency, args.max_tokens, 11, True),
                                         "c8b": (args.num_requests, args.concurrency, args.max_tokens, 11, False),
                                         "c1": (args.c1_requests, 1, 4, 7, True)}.items():
        report["load_commands"][name] = (
            f"mini-engine load --url http://127.0.0.1:PORT -n {n} --concurrency {c} --prompt-len {args.prompt_len} "
            f"--max-tokens {k} --ignore-eos --seed {seed} {'--stream' if stream else '--no-stream'} --timeout-s 120 "
            f"--deadline-s 600 -q")
    finish(args, report, names)


def markdown(rep: dict, names: list[str]) -> str:
    med = rep["median"]
    lines = ["# Ray Serve replicas vs plain `mini-engine serve` (CPU)", "",
             f"`{rep['command']}`", "",
             f"CPU: {rep['cpu']}, {rep['cores']} cores; model {rep['model']}.",
             f"Load before: `{rep['uptime_before']}`; after: `{rep['uptime_after']}`.", "",
             "Targets (each started fresh per round, order alternating between rounds):", ""]
    lines += [f"- **{n}**: `{rep['target_commands'][n]}`" for n in names]
    lines += ["", "Loads:", ""] + [f"- **{k}**: `{v} --out DIR`" for k, v in rep["load_commands"].items()]
    for load_name in LOADS:
        lines += ["", f"## {load_name}: medians over {max(r['round'] for r in rep['runs']) + 1} rounds", "",
                  "| target | output tok/s | req/s | TTFT p50 ms | TTFT p95 ms | e2e p50 ms | e2e p95 ms | "
                  "tok/s vs plain |", "|---|---|---|---|---|---|---|---|"]
        base = med.get("plain", {}).get(load_name, {}).get("output_throughput")
        for n in names:
            m = med[n][load_name]
            ratio = f"{m['output_throughput'] / base:.2f}" if base else "-"
            lines.append(f"| {n} | {m['output_throughput']:.1f} | {m['request_throughput']:.2f} | "
                         f"{m['median_ttft_ms']:.1f} | {m['p95_ttft_ms']:.1f} | {m['median_e2el_ms']:.1f} | "
                         f"{m['p95_e2el_ms']:.1f} | {ratio} |")
    lines += ["", "## Every run", "", "| round | target | load | load average | tok/s | TTFT p50 | e2e p50 | failed |",
              "|---|---|---|---|---|---|---|---|"]
    for run in rep["runs"]:
        for load_name in LOADS:
            m = run[load_name]
            lines.append(f"| {run['round']} | {run['target']} | {load_name} | "
                         f"{run['uptime'].split('load average:')[-1]} "
                         f"| {m['output_throughput']:.1f} | {m['median_ttft_ms']:.1f} | {m['median_e2el_ms']:.1f} "
                         f"| {m['failed']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
