"""A generation request as the scheduler sees it: its tokens, its KV blocks, its own sampling params."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..sampling import SamplingParams
from ..sequence import TokenLogprob


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_s: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    # prompt_ids + output_ids, kept as one list: block hashing and recompute read it every step.
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V is in the cache
    block_ids: list[int] = field(default_factory=list)
    num_hashed_blocks: int = 0  # leading full blocks registered with the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_cached_prompt: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    # Timestamps (perf_counter) for TTFT / ITL / queue time.
    first_scheduled_s: float = 0.0
    first_token_s: float = 0.0
    finish_s: float = 0.0
    token_s: list[float] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per output token when params.logprobs is set
    generator: Any = None  # numpy Generator for sampled (non-greedy) rows, seeded per request
    state: Any = None  # the engine's per-request extras (detokenizer, stream)

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_ids) + list(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output(self, token: int) -> None:
        self.output_ids.append(token)
        self.token_ids.append(token)
