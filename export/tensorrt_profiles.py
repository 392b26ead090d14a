"""TensorRT optimization profiles for the KV-cache I/O contract (no TensorRT import).

A TensorRT engine with dynamic shapes is tuned for ranges of input shapes.
Decoding has two phases with very different shapes, so the engine gets one
profile for each:

    context     (prefill)  seq 1..max_seq,  past = 0,            mask = seq
    generation  (decode)   seq = 1,         past 1..max_seq - 1, mask = past + 1

`attention_mask` is always past + seq long, as the contract says. A step with
past > 0 and seq > 1 (chunked prefill) fits neither and is refused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mini_engine.errors import ConfigError, MiniEngineError
from mini_engine.model.config import GPT2Config

CONTEXT, GENERATION = "context", "generation"
Shape = tuple[int, ...]


@dataclass(frozen=True)
class ProfileSettings:
    max_batch: int = 8
    max_seq: int = 1024  # past + new tokens
    opt_batch: int = 1
    opt_seq: int = 0  # 0 = derived: prompt length min(64, max_seq), past max_seq // 2

    def validate(self, cfg: GPT2Config) -> "ProfileSettings":
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        if not 2 <= self.max_seq <= cfg.n_positions:
            raise ConfigError(f"--max-seq must be in 2..{cfg.n_positions} (the model's context window), "
                              f"got {self.max_seq}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ConfigError(f"--opt-batch must be in 1..--max-batch ({self.max_batch}), got {self.opt_batch}")
        if not 0 <= self.opt_seq < self.max_seq:
            raise ConfigError(f"opt_seq must be in 0..{self.max_seq - 1}, got {self.opt_seq}")
        return self


@dataclass(frozen=True)
class Profile:
    name: str
    # input name -> (min, opt, max) shapes
    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        return cls(d["name"], {k: tuple(tuple(s) for s in v) for k, v in d["shapes"].items()})


def compute_profiles(cfg: GPT2Config, settings: ProfileSettings) -> list[Profile]:
    """The context and generation profiles, in that order (their engine profile indices)."""
    s = settings.validate(cfg)
    b = (1, s.opt_batch, s.max_batch)
    ctx_seq = (1, s.opt_seq or min(64, s.max_seq), s.max_seq)
    gen_past = (1, s.opt_seq or s.max_seq // 2, s.max_seq - 1)
    h, d = cfg.n_head, cfg.head_dim

    def phase(seq: Shape, past: Shape) -> dict[str, tuple[Shape, Shape, Shape]]:
        shapes = {"input_ids": tuple((b[i], seq[i]) for i in range(3)),
                  "position_ids": tuple((b[i], seq[i]) for i in range(3)),
                  "attention_mask": tuple((b[i], past[i] + seq[i]) for i in range(3))}
        for layer in range(cfg.n_layer):
            for kv in ("key", "value"):
                shapes[f"past_key_values.{layer}.{kv}"] = tuple((b[i], h, past[i], d) for i in range(3))
        return shapes

    return [Profile(CONTEXT, phase(ctx_seq, (0, 0, 0))), Profile(GENERATION, phase((1, 1, 1), gen_past))]


def select_profile(profiles: list[Profile], batch: int, seq: int, past: int) -> int:
    """Index of the profile that runs a step of this shape; a clear error when none does."""
    index = 0 if past == 0 else 1 if seq == 1 else None
    if index is None:
        raise MiniEngineError(f"a step with past length {past} and {seq} new tokens fits neither TensorRT "
                              f"profile (context: past 0; generation: one new token)")
    for name, shape in (("input_ids", (batch, seq)), ("attention_mask", (batch, past + seq))):
        lo, _, hi = profiles[index].shapes[name]
        if not all(a <= x <= z for a, x, z in zip(lo, shape, hi)):
            raise MiniEngineError(
                f"step shape {name}={list(shape)} is outside the engine's {profiles[index].name} profile "
                f"(min {list(lo)}, max {list(hi)}); rebuild with a larger --max-batch/--max-seq")
    return index


def describe_profiles(profiles: list[Profile]) -> str:
    """A table of min/opt/max per phase for the contract's non-KV inputs and one KV input."""
    rows = [("profile", "input", "min", "opt", "max")]
    for p in profiles:
        for name in ("input_ids", "attention_mask", "past_key_values.0.key"):
            lo, opt, hi = p.shapes[name]
            rows.append((p.name, name, "x".join(map(str, lo)), "x".join(map(str, opt)), "x".join(map(str, hi))))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    lines = ["  ".join(r[c].ljust(widths[c]) for c in range(5)).rstrip() for r in rows]
    lines.append("(position_ids as input_ids; every past_key_values.* as past_key_values.0.key)")
    return "\n".join(lines)


def settings_dict(settings: ProfileSettings) -> dict[str, int]:
    return asdict(settings)
