"""Per-request state during generation, and the finished result."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field


@dataclass
class TokenLogprob:
    """One generated position's log-probabilities (natural log) under the model's raw distribution
    (log_softmax of the logits before temperature/top-k/top-p and the min_tokens EOS mask)."""

    token_id: int  # the token generated here
    logprob: float  # its log-probability
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob) x k, best first

    def to_dict(self) -> dict:
        return {"token_id": self.token_id, "logprob": self.logprob, "top": [[t, lp] for t, lp in self.top]}


@dataclass
class Completion:
    prompt: str
    text: str
    token_ids: list[int]  # generated ids only (EOS included when it ended the row)
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop string) | "length" | "abort" | "error"
    ttft_ms: float
    total_ms: float
    # When each generated token was ready, ms after the request arrived (inter-token latency).
    # (Static batching: after its batch started.)
    token_times_ms: list[float] = field(default_factory=list, repr=False)
    queue_ms: float = 0.0  # arrival to first scheduled (continuous batching)
    cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache
    preemptions: int = 0  # times the request was preempted and recomputed
    # One per generated token, when the request asked for logprobs (SamplingParams.logprobs).
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / (self.total_ms / 1e3) if self.total_ms > 0 else 0.0

    @property
    def tpot_ms(self) -> float:
        """Time per output token after the first (vLLM's TPOT)."""
        n = len(self.token_ids)
        return (self.total_ms - self.ttft_ms) / (n - 1) if n > 1 else 0.0

    def to_dict(self) -> dict:
        """JSON-ready; `logprobs` is there only when it was asked for."""
        d = asdict(dataclasses.replace(self, token_times_ms=[], logprobs=None))
        del d["token_times_ms"], d["logprobs"]
        if self.logprobs is not None:
            d["logprobs"] = [lp.to_dict() for lp in self.logprobs]
        d["tokens_per_s"] = round(self.tokens_per_s, 2)
        d["tpot_ms"] = round(self.tpot_ms, 3)
        d["ttft_ms"] = round(self.ttft_ms, 3)
        d["total_ms"] = round(self.total_ms, 3)
        return d


@dataclass
class Sequence:
    """A row of a generation batch: its prompt, what it produced, and whether it is done."""

    index: int
    prompt: str
    prompt_ids: list[int]
    max_new_tokens: int | None = None  # this row's budget; None = the batch's params
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    text: str | None = None  # set when a stop string cut the text
    first_token_s: float = 0.0
    finish_s: float = 0.0
    token_s: list[float] = field(default_factory=list)  # perf_counter() of each new token
    logprobs: list[TokenLogprob] | None = None  # one per new token when params.logprobs is set
    stop_from: int = 0  # min_tokens: where in the text stop strings are looked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Score:
    """One forward pass over a prompt: the next token's top-k candidates."""

    prompt: str
    prompt_token_ids: list[int]
    top_ids: list[int]  # most likely next tokens, best first
    top_logprobs: list[float]  # their log-probabilities (natural log)
    top_logits: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RequestOutput:
    """What one engine step produced for one request: the stream's increment."""

    request_id: str
    new_token_ids: list[int]
    text: str  # text delta (complete UTF-8 characters only)
    finished: bool = False
    finish_reason: str | None = None
    completion: Completion | None = None  # set on the final output
    # One per entry of new_token_ids when the request asked for logprobs (SamplingParams.logprobs).
    logprobs: list[TokenLogprob] | None = None
    # finish_reason "error": what failed while computing this request (for logs and the Python
    # API; servers tell their clients less).
    error: str | None = None
