"""Sampling parameters and the sampler (numpy, backend-agnostic)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import ConfigError
from .sequence import TokenLogprob

MAX_LOGPROBS = 20  # as vLLM's default max_logprobs and OpenAI's top_logprobs limit
# Temperatures below this sample as greedy (vLLM's _SAMPLING_EPS): dividing logits by a
# denormal temperature overflows to inf and the softmax to NaN.
MIN_TEMPERATURE = 1e-5
# Seeds are OpenAI's: a signed 64-bit integer. The RNG takes it modulo 2**64, so every seed
# in range (negative ones too) and every per-prompt offset of one (seed + i) is a valid stream.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass
class SamplingParams:
    """Per-request generation settings (also the `[generation]` config section: each field is a key).

    logprobs: None = none returned; k in 0..MAX_LOGPROBS = for every generated token its
    log-probability plus the k most likely alternatives (k = 0: the sampled token only). They are
    of the model's raw distribution, log_softmax of the float32 logits, before temperature,
    top-k, top-p and the min_tokens EOS mask: what vLLM returns by default.
    min_tokens: as vLLM's, the request's first min_tokens output tokens cannot be EOS (its logit
    is -inf for them unless ignore_eos; transformers' MinNewTokensLengthLogitsProcessor) and stop
    strings are not looked for until there are min_tokens output tokens.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    truncate: bool = False  # keep the last tokens of an over-long prompt instead of failing
    logprobs: int | None = None  # None = off; k = the sampled token's logprob and the top k
    min_tokens: int = 0  # no EOS and no stop strings before this many output tokens

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed <= SEED_MAX):
            raise ConfigError(f"seed must be an integer in {SEED_MIN}..{SEED_MAX} (or unset), got {self.seed!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ConfigError(f"logprobs must be an integer in 0..{MAX_LOGPROBS} (or unset), got {self.logprobs!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise ConfigError(f"min_tokens must be an integer in 0..max_new_tokens ({self.max_new_tokens}), "
                              f"got {self.min_tokens!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def for_prompt(self, i: int) -> "SamplingParams":
        """These params for the i-th prompt of a request: the seed offset by i (kept in range)."""
        if self.seed is None or i == 0:
            return self
        return dataclasses.replace(self, seed=(self.seed + i - SEED_MIN) % 2**64 + SEED_MIN)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def make_rng(seed: int | None) -> np.random.Generator:
    """The RNG stream of a seed (None: fresh entropy); any integer, taken modulo 2**64."""
    return np.random.default_rng(None if seed is None else int(seed) % 2**64)


class Sampler:
    """Picks the next token per row from float32 logits [B, V] (static batching: one params)."""

    def __init__(self, params: SamplingParams, seeds: list[int | None]):
        self.params = params
        self.rngs = [make_rng(s) for s in seeds]

    def __call__(self, logits: np.ndarray, rows: list[int], ban: int | None = None) -> np.ndarray:
        """rows[i] is the request index of logits[i] (its RNG stream); `ban`: a token id no row
        may get (min_tokens' EOS). `logits` is never written to."""
        if self.params.greedy:
            out = logits.argmax(axis=-1)
            if ban is not None:
                for i in np.flatnonzero(out == ban):
                    out[i] = _without(logits[i], ban).argmax()
            return out
        return np.array([self._sample(logits[i] if ban is None else _without(logits[i], ban), self.rngs[r])
                         for i, r in enumerate(rows)])

    def _sample(self, logits: np.ndarray, rng: np.random.Generator) -> int:
        return sample_token(logits, self.params, rng)


def sample_rows(logits: np.ndarray, params: list[SamplingParams], rngs: list[np.random.Generator | None],
                ban_rows: Sequence[int] = (), ban: int | None = None) -> list[int]:
    """One token per row of logits [M, V], each row with its own params and RNG stream.

    Greedy rows are an argmax whatever else shares the batch, so they stay deterministic.
    Rows `ban_rows` cannot get token `ban` (min_tokens' EOS): its logit counts as -inf there.
    `logits` is never written to (it may be the runner's buffer; logprobs read it raw).
    """
    best = logits.argmax(axis=-1)
    # argmax stops at the first NaN, so a row with any NaN (a model or runner fault) shows here:
    # it must fail, not quietly become token 0.
    bad = np.isnan(logits[np.arange(len(best)), best])
    if bad.any():
        raise FloatingPointError(f"NaN logits in row(s) {np.flatnonzero(bad).tolist()} of the step")
    out = best.tolist()
    banned = set(ban_rows)
    for i, (p, rng) in enumerate(zip(params, rngs)):
        if not p.greedy and i not in banned:
            out[i] = sample_token(logits[i], p, rng)
    for i in banned:
        p = params[i]
        if not p.greedy:
            out[i] = sample_token(_without(logits[i], ban), p, rngs[i])
        elif out[i] == ban:  # otherwise the mask does not change the argmax
            out[i] = int(_without(logits[i], ban).argmax())
    return out


def _without(row: np.ndarray, token: int) -> np.ndarray:
    """A copy of one row of logits with `token` masked out."""
    row = row.copy()
    row[token] = -np.inf
    return row


def token_logprobs(logits: np.ndarray, tokens: Sequence[int], ks: Sequence[int]) -> list[TokenLogprob]:
    """Per row of raw logits [n, V]: tokens[i]'s log-probability and the ks[i] most likely tokens.

    Log-softmax of the float32 logits (no temperature, top-k/top-p or EOS mask), vectorised over
    the n rows: log Z from the max-shifted exponentials (stable), the differences in float64;
    only log Z and the few entries asked for are computed, not the full [n, V] log-softmax. The
    top k come from argpartition and are sorted best first, equal logits by lower token id.
    """
    x = np.asarray(logits, dtype=np.float32)
    n, vocab = x.shape
    m = x.max(axis=1, keepdims=True)
    e = x - m  # <= 0: exp cannot overflow; numpy's pairwise float32 sum is accurate to ~1e-7 here
    np.exp(e, out=e)
    log_z = m[:, 0].astype(np.float64) + np.log(e.sum(axis=1).astype(np.float64))
    tok = np.asarray(tokens, dtype=np.int64)
    chosen = (x[np.arange(n), tok].astype(np.float64) - log_z).tolist()
    kmax = min(max(ks, default=0), vocab)
    if kmax == 0:
        return [TokenLogprob(t, lp, []) for t, lp in zip(tok.tolist(), chosen)]
    part = np.argpartition(x, vocab - kmax, axis=1)[:, vocab - kmax:]  # the kmax largest, unordered
    vals = np.take_along_axis(x, part, axis=1)
    order = np.lexsort((part, -vals), axis=-1)  # best first, then lower id
    top_ids = np.take_along_axis(part, order, axis=1)
    top_lps = (np.take_along_axis(vals, order, axis=1).astype(np.float64) - log_z[:, None])
    ids_l, lps_l = top_ids.tolist(), top_lps.tolist()
    return [TokenLogprob(t, lp, list(zip(ids_l[i][:k], lps_l[i][:k])))
            for i, (t, lp, k) in enumerate(zip(tok.tolist(), chosen, ks))]


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
