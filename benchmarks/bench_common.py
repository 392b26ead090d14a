"""What the benchmark scripts share: the machine's facts, one target per subprocess, the report files."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def uptime() -> str:
    """`uptime`'s line: the load averages a result file records before and after a run."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def copy_bandwidth_gbps() -> float:
    import mini_engine  # noqa: F401 - first: it sets OpenBLAS's thread timeout before numpy loads OpenBLAS
    import numpy as np

    a = np.ones(64 * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    best = 1e9
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return round(2 * a.nbytes / best / 1e9, 1)


def run_targets(script: str, args) -> list[tuple[str, object, str | None]]:
    """Run `script --worker TARGET` with the parent's other flags, once per --targets entry, each in
    a fresh interpreter (thread pools of different runtimes do not mix). Its last stdout line is JSON.
    Returns (target, result, None) or (target, None, the reason it failed) per target."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
             if k not in ("targets", "out", "worker") and v is not None]
    out = []
    for target in args.targets.split(","):
        proc = subprocess.run([sys.executable, script, "--worker", target, *flags], capture_output=True, text=True)
        if proc.returncode != 0:
            out.append((target, None, (proc.stderr.strip().splitlines() or ["failed"])[-1]))
        else:
            out.append((target, json.loads(proc.stdout.strip().splitlines()[-1]), None))
    return out


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])


def write_report(out: str | None, report: dict, text: str) -> None:
    """OUT.json and OUT.md when --out is given; the markdown goes to stdout either way."""
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        path.with_suffix(".md").write_text(text)
    print(text)
