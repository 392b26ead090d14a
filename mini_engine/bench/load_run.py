"""A load run against an OpenAI-compatible server: `run_load(LoadConfig(...)) -> LoadResult`.

Arrivals (every run sends exactly num_requests requests and stops by itself by deadline_s):
- mode "benchmark", concurrency C: closed loop, C workers each sending its next request
  when its last one is answered;
- mode "benchmark", request_rate R: open loop, Poisson arrivals at R req/s seeded by
  `seed` (inf: all at once), whether or not earlier requests were answered;
- mode "concurrent", delay_ms D: request i starts at i*D ms, whatever the others do
  (the studies' staggered load).
A request past timeout_s fails as "timeout"; at deadline_s whatever is unanswered (sent
or not) fails as "deadline". Used by `mini-engine load` and callable from scripts.
"""
from __future__ import annotations

import asyncio
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import ConfigError, MiniEngineError
from .load_client import RequestRecord, ServerUnreachable, check_url, fetch_models, first_model, request_body, send
from .load_metrics import SLO_KEYS, summarize
from .load_prompts import PROMPT_TYPES, Prompt, dataset_prompts, synthetic_prompts

MODES = ("benchmark", "concurrent")
DEFAULT_PROMPT_LEN = 32
MAX_POOL = 512  # connections kept by open-loop and staggered runs (closed loops: one per worker)
CSV_FIELDS = ("index", "start_s", "status", "prompt_tokens", "output_tokens", "ttft_ms", "tpot_ms", "e2el_ms",
              "finish_reason", "error_kind", "error")
OUTPUTS = ("load.json", "requests.csv")


@dataclass
class LoadConfig:
    url: str  # the server root, e.g. http://127.0.0.1:8000
    num_requests: int
    concurrency: int | None = None
    request_rate: float | None = None  # req/s; math.inf = all at once
    mode: str = "benchmark"  # benchmark | concurrent
    delay_ms: float | None = None  # concurrent mode: gap between request starts
    model: str | None = None  # None: the first id of GET /v1/models
    api_key: str | None = None
    stream: bool = True
    prompt_len: int | None = None  # synthetic prompts of this many tokens [32 without a dataset]
    prompt_type: str = "text"  # text | ids (see load_prompts)
    dataset: str | None = None
    max_tokens: int = 32
    ignore_eos: bool = False
    temperature: float = 0.0
    seed: int = 0
    endpoint: str = "/v1/completions"
    timeout_s: float = 120.0  # per request
    deadline_s: float = 1800.0  # the whole run
    slo: dict[str, float] = field(default_factory=dict)  # ttft_ms / tpot_ms / e2el_ms limits for goodput
    allow_remote: bool = False
    progress: bool = False  # tqdm bar on stderr

    def validate(self) -> str:
        """Raise ConfigError naming the first bad field; return the checked server root."""
        base = check_url(self.url, self.allow_remote)
        if self.num_requests < 1:
            raise ConfigError(f"--num-requests {self.num_requests}: must be >= 1")
        if self.mode not in MODES:
            raise ConfigError(f"--mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "benchmark":
            if (self.concurrency is None) == (self.request_rate is None):
                raise ConfigError("--mode benchmark takes exactly one of --concurrency (closed loop) and "
                                  "--request-rate (open loop)")
            if self.delay_ms is not None:
                raise ConfigError("--delay-ms belongs to --mode concurrent")
        else:
            if self.concurrency is not None or self.request_rate is not None:
                raise ConfigError("--mode concurrent starts a request every --delay-ms; it takes no --concurrency "
                                  "or --request-rate")
            if self.delay_ms is None or not self.delay_ms >= 0 or math.isinf(self.delay_ms):
                raise ConfigError("--mode concurrent needs --delay-ms D >= 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"--concurrency {self.concurrency}: must be >= 1")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ConfigError(f"--request-rate {self.request_rate}: must be > 0 (inf: all at once)")
        if self.dataset is not None and self.prompt_len is not None:
            raise ConfigError("--prompt-len and --dataset are alternatives: give one")
        if self.prompt_type not in PROMPT_TYPES:
            raise ConfigError(f"--prompt-type {self.prompt_type!r}: expected one of {', '.join(PROMPT_TYPES)}")
        if self.prompt_len is not None and self.prompt_len < 1:
            raise ConfigError(f"--prompt-len {self.prompt_len}: must be >= 1")
        if self.max_tokens < 1:
            raise ConfigError(f"--max-tokens {self.max_tokens}: must be >= 1")
        for name in ("timeout_s", "deadline_s"):
            value = getattr(self, name)
            if not value > 0 or math.isinf(value):
                raise ConfigError(f"--{name.replace('_', '-')} {value}: must be a positive number of seconds")
        if not self.endpoint.startswith("/"):
            raise ConfigError(f"--endpoint {self.endpoint!r}: a path on the server, starting with /")
        for key, limit in self.slo.items():
            if key not in SLO_KEYS:
                raise ConfigError(f"--slo {key}: expected one of {', '.join(SLO_KEYS)}")
            if not limit > 0:
                raise ConfigError(f"--slo {key}={limit}: the limit must be > 0 ms")
        if "tpot_ms" in self.slo and not self.stream:
            raise ConfigError("--slo tpot_ms needs streaming: --no-stream measures no per-token times")
        return base

    def describe_load(self) -> str:
        """The arrival pattern as one "label: value" line of the result table."""
        if self.mode == "concurrent":
            return f"Request interval (ms): {self.delay_ms:g} (staggered starts, --mode concurrent)"
        if self.concurrency is not None:
            return f"Maximum request concurrency: {self.concurrency} (closed loop)"
        rate = "inf (all at once)" if math.isinf(self.request_rate) else f"{self.request_rate:g} (Poisson)"
        return f"Request rate configured (RPS): {rate}"

    def parameters(self) -> dict[str, Any]:
        d = asdict(self)
        del d["progress"]
        d["api_key"] = "(set)" if self.api_key else None
        if d["request_rate"] is not None and math.isinf(d["request_rate"]):
            d["request_rate"] = "inf"
        if self.dataset is None and self.prompt_len is None:
            d["prompt_len"] = DEFAULT_PROMPT_LEN
        return d


@dataclass
class LoadResult:
    config: LoadConfig
    model: str
    models: dict[str, Any] | None  # the server's GET /v1/models answer (None if it gave none)
    records: list[RequestRecord]
    summary: dict[str, Any]
    started_at: str  # ISO-8601 UTC
    notes: list[str] = field(default_factory=list)
    command: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary, "parameters": self.config.parameters() | {"model": self.model},
                "load": self.config.describe_load(), "server": {"url": self.config.url, "models": self.models},
                "started_at": self.started_at, "command": self.command, "notes": self.notes,
                "requests": [r.to_dict() for r in self.records]}

    def errors(self, limit: int = 5) -> list[str]:
        """The first distinct error messages, one per kind and message."""
        seen: dict[str, None] = {}
        for r in self.records:
            if r.error_kind and len(seen) < limit:
                seen.setdefault(f"{r.error_kind}: {r.error}")
        return list(seen)

    def write(self, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        (out / "load.json").write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")
        with (out / "requests.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for r in self.records:
                row = r.to_dict()
                writer.writerow({k: "" if row[k] is None else _round(row[k]) for k in CSV_FIELDS})
        return [out / name for name in OUTPUTS]


def check_out(out: Path, force: bool = False) -> None:
    """Refuse, before the run, an --out that is a file or already holds a run's results (unless force)."""
    if out.exists() and not out.is_dir():
        raise MiniEngineError(f"--out {out} is a file, not a directory")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not force:
        raise MiniEngineError(f"--out {out} already holds {', '.join(existing)}; pass --force to replace them, "
                              f"or choose another directory")


def run_load(config: LoadConfig, transport=None) -> LoadResult:
    """Run `config` to the end (asyncio inside; from async code await run_load_async)."""
    return asyncio.run(run_load_async(config, transport))


async def run_load_async(config: LoadConfig, transport=None) -> LoadResult:
    """`transport`: an httpx transport to use instead of the network (tests)."""
    import httpx

    base = config.validate()
    n = config.num_requests
    prompts = (dataset_prompts(config.dataset, n) if config.dataset is not None else
               synthetic_prompts(n, config.prompt_len or DEFAULT_PROMPT_LEN, config.seed, config.prompt_type))
    pool = config.concurrency if config.concurrency is not None else min(n, MAX_POOL)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    notes = []
    # trust_env=False: no proxy from the environment ever sees (or redirects) loopback traffic.
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
                                 timeout=httpx.Timeout(config.timeout_s), trust_env=False, headers=headers,
                                 transport=transport) as client:
        models = None
        try:
            models = await fetch_models(client, base)
        except ServerUnreachable:
            raise
        except MiniEngineError as e:
            if config.model is None:
                raise
            notes.append(f"{e} (using --model {config.model})")
        model = config.model or first_model(models, base)
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        records, duration, deadline_hit = await _drive(client, config, base + config.endpoint, model, prompts)
    if deadline_hit:
        notes.append(f"the run reached --deadline-s {config.deadline_s:g} with "
                     f"{sum(r.error_kind == 'deadline' for r in records)} requests unanswered")
    summary = summarize(records, duration, config.slo)
    return LoadResult(config, model, models, records, summary, started_at, notes)


async def _drive(client, config: LoadConfig, url: str, model: str, prompts: list[Prompt]):
    n = config.num_requests
    records = [RequestRecord(i, stream=config.stream) for i in range(n)]
    finished: set[int] = set()
    bar = _progress(n, config.progress)
    tasks: list[asyncio.Task] = []

    async def one(i: int) -> None:
        p = prompts[i]
        body = request_body(model, p.prompt, p.max_tokens or config.max_tokens, config.stream, config.ignore_eos,
                            config.temperature)
        await send(client, url, body, records[i], t0, config.timeout_s, p.tokens)
        finished.add(i)
        if bar is not None:
            bar.update(1)

    async def closed_loop() -> None:
        indices = iter(range(n))  # shared by the workers; asyncio runs one at a time

        async def worker() -> None:
            for i in indices:
                await one(i)

        tasks.extend(asyncio.ensure_future(worker()) for _ in range(min(config.concurrency, n)))
        await asyncio.gather(*tasks)

    async def scheduled(offsets: list[float]) -> None:
        for i, offset in enumerate(offsets):
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)

    t0 = time.perf_counter()
    main = asyncio.ensure_future(closed_loop() if config.concurrency is not None else scheduled(_offsets(config)))
    try:
        done, _ = await asyncio.wait({main}, timeout=config.deadline_s)
        deadline_hit = not done
        if deadline_hit:
            for t in [main, *tasks]:
                t.cancel()
            await asyncio.gather(main, *tasks, return_exceptions=True)
        else:
            main.result()  # a bug in the loop surfaces here
        duration = time.perf_counter() - t0
    finally:
        if bar is not None:
            bar.close()
    for r in records:
        if r.index not in finished:
            r.error_kind = "deadline"
            r.error = (f"the run's --deadline-s {config.deadline_s:g} passed "
                       + ("before an answer" if r.start_s is not None else "before it was sent"))
    return records, duration, deadline_hit


def _offsets(config: LoadConfig) -> list[float]:
    """Start times (s from the run's start) of the open-loop and staggered runs."""
    n = config.num_requests
    if config.mode == "concurrent":
        return [i * config.delay_ms / 1e3 for i in range(n)]
    if math.isinf(config.request_rate):
        return [0.0] * n
    import numpy as np

    # As vLLM's: the first request at once, then exponential gaps (a Poisson process).
    gaps = np.random.default_rng([config.seed, 1]).exponential(1.0 / config.request_rate, size=n - 1)
    return [0.0] + [float(x) for x in np.cumsum(gaps)]


def _progress(total: int, enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)


def _round(v):
    return round(v, 3) if isinstance(v, float) else v
