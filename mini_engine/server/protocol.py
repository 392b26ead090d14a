"""Request and response bodies: OpenAI's Completions schema (plus vLLM's extensions) and the
native /generate endpoints, as pydantic models.

Requests forbid unknown fields: a misspelt parameter is a 400 that names it, not a silently
ignored setting. Fields OpenAI defines but this engine does not implement are accepted only
at their neutral value, so a client that sends its defaults works and one that relies on
them is told.
"""
from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

# OpenAI's Completions API caps logprobs at 5.
MAX_LOGPROBS = 5


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: StrictBool = False
    continuous_usage_stats: StrictBool = False  # vLLM: usage on every chunk


PromptIds = list[StrictInt]


class CompletionRequest(_Strict):
    """POST /v1/completions. Defaults are OpenAI's (max_tokens 16, temperature 1)."""

    model: Optional[str] = None
    prompt: Union[str, list[str], PromptIds, list[PromptIds]]
    max_tokens: Optional[StrictInt] = Field(16, ge=1)
    temperature: Optional[float] = Field(1.0, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = 1
    best_of: Optional[StrictInt] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[StrictInt] = None
    user: Optional[str] = None
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None
    suffix: Optional[str] = None
    # vLLM's extensions
    top_k: Optional[StrictInt] = Field(None, ge=-1)
    min_tokens: StrictInt = Field(0, ge=0)
    ignore_eos: StrictBool = False
    # mini-engine's: keep the prompt's last tokens when prompt + max_tokens exceed the window
    truncate: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if any(isinstance(p, list) and not p for p in v):
                raise ValueError("a token-id prompt must not be empty")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @model_validator(mode="after")
    def _unsupported(self):
        if self.n != 1:
            raise _Unsupported("n", "n must be 1: this server returns one completion per prompt")
        if self.best_of not in (None, 1):
            raise _Unsupported("best_of", "best_of must be 1 (or absent)")
        if self.presence_penalty or self.frequency_penalty:
            raise _Unsupported("presence_penalty" if self.presence_penalty else "frequency_penalty",
                               "presence and frequency penalties are not supported; leave them at 0")
        if self.logit_bias:
            raise _Unsupported("logit_bias", "logit_bias is not supported")
        if self.suffix:
            raise _Unsupported("suffix", "suffix (insertion) is not supported by GPT-2")
        if self.echo and self.logprobs is not None:
            raise _Unsupported("logprobs", "logprobs together with echo (log-probabilities of the prompt's "
                                           "tokens) is not supported; ask for one or the other")
        if self.stream_options is not None and not self.stream:
            raise _Unsupported("stream_options", "stream_options is only allowed with stream: true")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _Unsupported("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed "
                                             f"max_tokens ({self.max_tokens})")
        return self

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


class _Unsupported(ValueError):
    """A value the engine does not implement: a 400 naming the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length"]] = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class CompletionChunk(BaseModel):
    """One Server-Sent Event of a streamed completion (same object name as OpenAI's)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "mini-engine"
    max_model_len: int
    backend: str
    device: str
    chat_template: Optional[str] = None  # GPT-2 has none: /v1/chat/completions answers 400


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class GenerateRequest(_Strict):
    """POST /generate and /generate/stream: the studies' native endpoints, one prompt each."""

    prompt: Union[str, PromptIds]
    max_new_tokens: StrictInt = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_k: StrictInt = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[StrictInt] = None
    stop: list[str] = Field(default_factory=list, max_length=4)
    ignore_eos: StrictBool = False
    truncate: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("a token-id prompt must not be empty")
        return v


class GenerateResponse(BaseModel):
    request_id: str
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    queue_ms: float
    ttft_ms: float
    e2e_ms: float
    tpot_ms: float
    tokens_per_s: float
    cached_prompt_tokens: int
    preemptions: int


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None  # OpenAI's: a string or null


class ErrorResponse(BaseModel):
    error: ErrorInfo
