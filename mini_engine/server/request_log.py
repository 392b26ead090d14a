"""The per-request CSV log (`server.log_csv`), read back by `mini-engine analyze`.

Rows are handed to a writer thread, so a slow disk never blocks the event loop; `close()`
drains what is queued before it returns, so no row is lost on shutdown.
"""
from __future__ import annotations

import csv
import datetime as dt
import queue
import threading
from pathlib import Path

import psutil

COLUMNS = ("timestamp", "request_id", "endpoint", "mode", "prompt_tokens", "output_tokens", "queue_ms", "ttft_ms",
           "e2e_ms", "tokens_per_s", "finish_reason", "status", "rss_mib", "device_mem_mib", "backend", "device")

_STOP = object()


class RequestLog:
    def __init__(self, path: str | Path, backend: str, device: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.backend, self.device = backend, device
        self._proc = psutil.Process()
        self._cuda = device.startswith("cuda")
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = self.path.open("a", newline="", encoding="utf-8")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(COLUMNS)
            self._file.flush()
        self.rows = 0
        self._thread = threading.Thread(target=self._write_loop, name="request-log", daemon=True)
        self._thread.start()

    def record(self, request_id: str, endpoint: str, mode: str, status: int, finish_reason: str,
               prompt_tokens: int = 0, output_tokens: int = 0, queue_ms: float | None = None,
               ttft_ms: float | None = None, e2e_ms: float | None = None) -> None:
        tps = output_tokens / (e2e_ms / 1e3) if e2e_ms else None
        row = (dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), request_id, endpoint, mode,
               prompt_tokens, output_tokens, _fmt(queue_ms), _fmt(ttft_ms), _fmt(e2e_ms), _fmt(tps), finish_reason,
               status, f"{self._proc.memory_info().rss / 2**20:.1f}", self._device_mem(), self.backend, self.device)
        self._q.put(row)

    def _device_mem(self) -> str:
        if not self._cuda:
            return ""
        try:
            import torch

            return f"{torch.cuda.memory_allocated() / 2**20:.1f}"
        except Exception:  # noqa: BLE001 - a log row must not fail over a memory reading
            return ""

    def _write_loop(self) -> None:
        while True:
            row = self._q.get()
            if row is _STOP:
                break
            self._csv.writerow(row)
            self.rows += 1
            try:
                while True:  # write what is queued, then flush once
                    row = self._q.get_nowait()
                    if row is _STOP:
                        self._file.flush()
                        return
                    self._csv.writerow(row)
                    self.rows += 1
            except queue.Empty:
                pass
            self._file.flush()
        self._file.flush()

    def close(self) -> None:
        self._q.put(_STOP)
        self._thread.join(30)
        self._file.close()


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.3f}"
