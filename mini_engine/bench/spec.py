"""What a benchmark run measures: the validated form of `mini-engine bench`'s flags."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import _parse_value, load_config, options_for
from ..errors import ConfigError

MODES = ("forward", "generate", "naive-vs-optimized", "continuous")

# Defaults per mode, chosen to finish in about two minutes on a 2-core CPU with random:gpt2
# (two targets). Forward prompts are short on purpose: scoring a short prompt is where
# batching pays, since batch 1 is bound by reading the weights, not by arithmetic.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "forward": {"batch_sizes": [1, 2, 4, 8, 16], "requests": 48, "trials": 3},
    "generate": {"batch_sizes": [1, 4, 16], "requests": 16, "trials": 2},
    "naive-vs-optimized": {"batch_sizes": [16], "requests": 16, "trials": 1},
    # The fixed mixed-length workload (mini_engine/bench/continuous.py); batch sizes are
    # the static batcher's sweep.
    "continuous": {"batch_sizes": [4, 8, 16, 32], "requests": 64, "trials": 1},
}


@dataclass
class Target:
    spec: str  # "backend:device[@dtype]" as the user wrote it
    backend: str
    device: str
    dtype: str | None = None  # the target's model.dtype (e.g. torch:cpu@int8); None = the config's

    @classmethod
    def parse(cls, text: str) -> "Target":
        from ..config import DTYPES

        text = text.strip()
        head, at, dtype = text.partition("@")
        backend, _, device = head.partition(":")
        if not backend:
            raise ConfigError(f"target '{text}' must look like backend:device[@dtype], e.g. torch:cpu or "
                              f"onnxruntime:cpu@int8")
        if at and dtype not in DTYPES:
            raise ConfigError(f"target '{text}': precision '@{dtype}' must be one of {', '.join(DTYPES)}")
        spec = f"{backend}:{device or 'cpu'}" + (f"@{dtype}" if at else "")
        return cls(spec, backend, device or "cpu", dtype or None)


@dataclass
class BenchSpec:
    targets: list[Target]
    mode: str = "forward"
    batch_sizes: list[int] = field(default_factory=list)
    requests: int = 0
    trials: int = 0
    prompt_len: int = 8
    max_new_tokens: int = 16
    concurrency: int | None = None  # closed loop clients; None = 2 * max(batch_sizes)
    request_rate: float | None = None  # open loop (Poisson) arrivals per second
    warmup: int | None = None  # requests per point before measuring; None = one full batch
    top_k: int = 5
    seed: int = 0
    prompt_lens: tuple[int, int] = (16, 256)  # continuous mode: uniform prompt lengths
    output_lens: tuple[int, int] = (16, 256)  # continuous mode: uniform output lengths (EOS ignored)
    naive_requests: int = 8  # continuous mode: the naive baseline's seeded subset
    max_num_seqs: int = 16  # continuous mode: continuous batching's max_num_seqs
    config: dict[str, Any] = field(default_factory=dict)  # the resolved Config as a dict
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-backend option overrides

    def __post_init__(self):
        if len({t.spec for t in self.targets}) != len(self.targets):
            raise ConfigError(f"--targets lists a target twice: {', '.join(t.spec for t in self.targets)}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        defaults = MODE_DEFAULTS[self.mode]
        self.batch_sizes = sorted(set(self.batch_sizes or defaults["batch_sizes"]))
        self.requests = self.requests or defaults["requests"]
        self.trials = self.trials or defaults["trials"]
        if not self.targets:
            raise ConfigError("--targets is empty; give e.g. torch:cpu,onnxruntime:cpu")
        if min(self.batch_sizes) < 1:
            raise ConfigError(f"--batch-sizes must be >= 1, got {self.batch_sizes}")
        for name, value in (("--requests", self.requests), ("--trials", self.trials),
                            ("--prompt-len", self.prompt_len), ("--max-new-tokens", self.max_new_tokens),
                            ("--top-k", self.top_k)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.concurrency is not None and self.request_rate is not None:
            raise ConfigError("give --concurrency (closed loop) or --request-rate (open loop), not both")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ConfigError(f"--request-rate must be > 0, got {self.request_rate}")
        if self.warmup is not None and self.warmup < 0:
            raise ConfigError(f"--warmup must be >= 0, got {self.warmup}")
        self.prompt_lens, self.output_lens = tuple(self.prompt_lens), tuple(self.output_lens)
        for name, (lo, hi) in (("--prompt-lens", self.prompt_lens), ("--output-lens", self.output_lens)):
            if not 1 <= lo <= hi:
                raise ConfigError(f"{name} must be LO:HI with 1 <= LO <= HI, got {lo}:{hi}")
        if self.naive_requests < 1 or self.max_num_seqs < 1:
            raise ConfigError("--naive-requests and --max-num-seqs must be >= 1")
        if self.mode == "continuous":
            return  # its arrivals are its own (burst and Poisson)
        if self.request_rate is None and self.concurrency is None:
            # Enough clients to keep the largest batch full. Exactly max(batch_sizes) is
            # not: a closed loop then settles into two half-size groups that take turns
            # (one group resubmits while the other runs), measured as mean batch 8 of 16.
            self.concurrency = 2 * max(self.batch_sizes)

    @property
    def generates(self) -> bool:
        return self.mode != "forward"

    @property
    def load(self) -> str:
        if self.request_rate is not None:
            return f"open loop, Poisson {self.request_rate:g} req/s"
        return f"closed loop, {self.concurrency} clients"

    def target_config(self, target: Target) -> dict[str, Any]:
        """The Config dict for one target, by the rule `generate` follows (config.options_for): the
        target's own [backend.options.<name>] table, plus the flat keys when it is backend.name."""
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in self.config.items()}
        base = self.config["backend"]
        options = options_for(base["options"], base["name"], target.backend)
        options.update(self.options.get(target.backend, {}))
        raw["backend"] = {"name": target.backend, "device": target.device, "options": options}
        if target.dtype:
            raw["model"] = dict(raw["model"], dtype=target.dtype)
        return raw

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchSpec":
        d = dict(d)
        d["targets"] = [Target(**t) for t in d["targets"]]
        return cls(**d)


def parse_range(text: str | None, name: str) -> tuple[int, int] | None:
    """'LO:HI' (or one number) -> (lo, hi)."""
    if not text:
        return None
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise ConfigError(f"{name} expects LO:HI like 16:256, got '{text}'") from None


def parse_targets(text: str) -> list[Target]:
    return [Target.parse(t) for t in text.split(",") if t.strip()]


def parse_batch_sizes(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes expects comma-separated integers like 1,2,4,8, got '{text}'") from None


def parse_options(items: tuple[str, ...] | list[str]) -> dict[str, dict[str, Any]]:
    """`--option BACKEND.KEY=VALUE` -> {backend: {key: value}} (values parsed as TOML)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        backend, dot, name = key.strip().partition(".")
        if not sep or not dot or not backend or not name:
            raise ConfigError(f"--option expects BACKEND.KEY=VALUE (e.g. torch.threads=2), got '{item}'")
        out.setdefault(backend, {})[name] = _parse_value(value.strip())
    return out


def resolve_config(config_path: str | None, overrides: tuple[str, ...], model: str | None,
                   dtype: str | None) -> dict[str, Any]:
    """Validate the config file and --set overrides once, before any target runs."""
    return load_config(config_path, overrides, **{"model.source": model, "model.dtype": dtype}).to_dict()
