"""The benchmark run: check each target, run the runnable ones one process each, write the report."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..devices import cuda_unavailable_reason
from ..errors import MiniEngineError
from ..registry import list_backends
from . import continuous, metrics, report
from .spec import BenchSpec, Target


def run_bench(spec: BenchSpec, out: Path, progress: bool = True, command: str = "") -> dict[str, Any]:
    """Run every target of `spec`, write CSV/JSON/PNG under `out`, return the result dict (its
    "written" lists the files written). The CLI checks `out` first (report.prepare_out)."""
    from ..devices import module_installed

    missing = [m for m in ("tqdm", "matplotlib") if not module_installed(m)]
    if missing:
        raise MiniEngineError(f"the benchmark needs {' and '.join(missing)}: pip install 'mini-engine[bench]'")
    from tqdm import tqdm

    started = time.time()
    machine = metrics.machine_info()
    bandwidth = metrics.memory_bandwidth_gbps()  # before any target runs, on a quiet process
    rows: list[dict[str, Any]] = []
    runnable: list[Target] = []
    for target in spec.targets:
        reason = skip_reason(target)
        if reason:
            rows += _missing_rows(spec, target, "skipped", reason)
        else:
            runnable.append(target)
    per_target = len(_points(spec)) if spec.mode == "continuous" else \
        spec.trials * (len(spec.batch_sizes) + (spec.mode == "naive-vs-optimized"))
    targets_info: dict[str, Any] = {}
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with tqdm(total=per_target * len(runnable), file=sys.stderr, disable=not progress, unit="trial",
              dynamic_ncols=True) as bar:
        for target in runnable:
            bar.set_description(target.spec)
            log = logs / f"{target.spec.replace(':', '_')}.log"
            got, info, error = _run_child(spec, target, bar, log)
            rows += got
            targets_info[target.spec] = info | {"log": str(log)}
            if error and spec.mode == "continuous":
                left = len(_points(spec)) - len(got)
                rows += _missing_rows(spec, target, "failed", error, [("continuous", spec.max_num_seqs)])
                bar.update(max(left, 0))
            elif error:
                done = {(r["mode"], r["batch_size"]) for r in got}
                missing = [p for p in _points(spec) if p not in done]
                rows += _missing_rows(spec, target, "failed", error, missing)
                bar.update((1 if spec.mode == "continuous" else spec.trials) * len(missing))
    order = {t.spec: i for i, t in enumerate(spec.targets)}
    rows.sort(key=lambda r: order[r["target"]])  # stable: the user's target order, points in sweep order
    for r in rows:
        r["machine_bandwidth_gbps"] = bandwidth
        if spec.mode == "continuous":
            r.setdefault("arrivals", "-")
        if r.get("bandwidth_gbps") is not None:
            r["bandwidth_fraction"] = round(r["bandwidth_gbps"] / bandwidth, 3)
    result = {
        "meta": {
            "command": command, "started": datetime.fromtimestamp(started, timezone.utc).isoformat(),
            "duration_s": round(time.time() - started, 1), "machine": machine,
            "machine_bandwidth_gbps": bandwidth, "model": spec.config["model"]["source"],
            "mode": spec.mode, "load": spec.load, "config": spec.config, "spec": spec.to_dict(),
            "targets": targets_info,
        },
        "results": rows,
        "best_vs_batch1": report.best_vs_batch1(rows) if spec.mode != "continuous" else [],
        "comparison": report.comparison(rows) if spec.mode == "naive-vs-optimized" else
        continuous.comparison(rows) if spec.mode == "continuous" else [],
    }
    # Not in bench.json: the files this call wrote (no plots when no target was measured).
    result["written"] = report.write_all(result, out)
    return result


def skip_reason(target: Target) -> str | None:
    """None when the target can run here, else why not (never raises)."""
    infos = {i.name: i for i in list_backends()}
    info = infos.get(target.backend)
    if info is None:
        return f"unknown backend '{target.backend}' (installed: {', '.join(infos) or 'none'})"
    if not info.available:
        return info.reason or "unavailable"
    kind = target.device.split(":")[0]
    if kind == "cuda" and cuda_unavailable_reason():
        return cuda_unavailable_reason()
    if kind not in info.devices:
        return f"backend '{target.backend}' cannot use device '{target.device}' here " \
               f"(devices: {', '.join(info.devices) or 'none'})"
    return None


def _points(spec: BenchSpec) -> list[tuple[str, int]]:
    if spec.mode == "continuous":
        # naive, static per batch size and continuous (burst), then static-best and continuous (Poisson)
        return [("naive", 1)] + [("static", bs) for bs in spec.batch_sizes] + [("continuous", spec.max_num_seqs)] \
            + [("static", -1), ("continuous", -1)]
    mode = "forward" if spec.mode == "forward" else "generate"
    pts = [(mode, bs) for bs in spec.batch_sizes]
    return pts + [("naive", 1)] if spec.mode == "naive-vs-optimized" else pts


def _missing_rows(spec: BenchSpec, target: Target, status: str, reason: str,
                  points: list[tuple[str, int]] | None = None) -> list[dict[str, Any]]:
    return [{"target": target.spec, "backend": target.backend, "device": target.device, "mode": mode,
             "batch_size": bs, "status": status, "reason": reason, "load": spec.load, "trials": spec.trials,
             "requests": spec.requests, "prompt_len": spec.prompt_len, "model": spec.config["model"]["source"]}
            for mode, bs in (points if points is not None else _points(spec))]


def _run_child(spec: BenchSpec, target: Target, bar, log: Path):
    """Run one target in a fresh interpreter; returns (rows, info, error or None)."""
    rows, info, error = [], {}, None
    task = json.dumps({"spec": spec.to_dict(), "target": target.__dict__})
    with log.open("w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "mini_engine.bench.runner_process"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=log_file, text=True)
        try:
            proc.stdin.write(task)
            proc.stdin.close()
            for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                kind = event.get("event")
                if kind == "progress":
                    bar.update(1)
                elif kind == "row":
                    rows.append(event["row"])
                elif kind == "info":
                    info = event["info"]
                elif kind == "error":
                    error = event["reason"]
            code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if error is None and code != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        error = f"the target's process exited with code {code}" + (f": {tail[-1]}" if tail else "")
    if error is None and len(rows) < len(_points(spec)):
        error = "the target's process stopped before measuring every point"
    return rows, info, error
