"""Sampling parameters and the sampler (numpy, backend-agnostic)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    truncate: bool = False  # keep the last tokens of an over-long prompt instead of failing

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks the next token per row from float32 logits [B, V]."""

    def __init__(self, params: SamplingParams, seeds: list[int | None]):
        self.params = params
        self.rngs = [np.random.default_rng(s) for s in seeds]

    def __call__(self, logits: np.ndarray, rows: list[int]) -> np.ndarray:
        """rows[i] is the request index of logits[i] (its RNG stream)."""
        if self.params.greedy:
            return logits.argmax(axis=-1)
        return np.array([self._sample(logits[i], self.rngs[r]) for i, r in enumerate(rows)])

    def _sample(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        return sample_token(logits, self.params, rng)


def sample_rows(logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator | None]) -> list[int]:
    """One token per row of logits [M, V], each row with its own params and RNG stream.

    Greedy rows are an argmax whatever else shares the batch, so they stay deterministic.
    """
    out = logits.argmax(axis=-1).tolist()
    for i, (p, rng) in enumerate(zip(params, rngs)):
        if not p.greedy:
            out[i] = sample_token(logits[i], p, rng)
    return out


def sample_token(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator) -> int:
    """Temperature, then top-k, then top-p, then a draw from `rng`."""
    x = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < x.shape[0]:
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x = np.where(x < kth, -np.inf, x)
    x = x - x.max()
    probs = np.exp(x)
    probs /= probs.sum()
    if p.top_p < 1.0:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, p.top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.shape[0], p=probs))
