"""The `[scheduler]` config section, named after vLLM's engine arguments."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


@dataclass
class SchedulerConfig:
    # Sequences in one step (vLLM's max_num_seqs).
    max_num_seqs: int = 16
    # Token budget of one step: decodes (1 token each) first, then prompt tokens.
    max_num_batched_tokens: int = 512
    # A prompt longer than what is left of the budget is prefilled in chunks across
    # steps instead of stalling the running decodes behind it.
    enable_chunked_prefill: bool = True
    # Tokens per KV block; 0 = the backend's choice (Runner.preferred_block_size: 128 for the torch
    # CPU kernel, 16 elsewhere), at most 1/8 of the model's context window (but >= 16).
    # Prefix caching shares whole blocks only.
    block_size: int = 0
    # KV pool size: num_kv_blocks when > 0, else as many blocks as kv_cache_mib holds
    # (never more than max_num_seqs full context windows, which is all that can be used).
    num_kv_blocks: int = 0
    kv_cache_mib: float = 1024.0
    enable_prefix_caching: bool = True
    policy: str = "fcfs"

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"scheduler.{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size < 0:
            raise ConfigError(f"scheduler.block_size must be >= 1, or 0 for the backend's choice; got {self.block_size}")
        if self.num_kv_blocks < 0:
            raise ConfigError(f"scheduler.num_kv_blocks must be >= 0 (0 = from kv_cache_mib), got {self.num_kv_blocks}")
        if self.num_kv_blocks == 0 and self.kv_cache_mib <= 0:
            raise ConfigError(f"scheduler.kv_cache_mib must be > 0, got {self.kv_cache_mib}")
        if self.policy != "fcfs":
            raise ConfigError(f"scheduler.policy must be 'fcfs' (the only policy), got '{self.policy}'")

    def check_model(self, max_model_len: int) -> None:
        """What can only be checked against the model's context window."""
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < max_model_len:
            raise ConfigError(
                f"scheduler.max_num_batched_tokens ({self.max_num_batched_tokens}) is below the context window "
                f"({max_model_len}) with chunked prefill off, so a long prompt could never be scheduled; "
                f"raise it or set scheduler.enable_chunked_prefill = true")

    def pool_blocks(self, bytes_per_token: int, max_model_len: int) -> int:
        """Blocks in the KV pool for a model whose cache costs `bytes_per_token` (block_size resolved)."""
        if self.block_size < 1:
            raise ValueError("resolve block_size (0 = auto) before sizing the pool")
        per_seq = -(-max_model_len // self.block_size)
        if self.num_kv_blocks:
            return self.num_kv_blocks
        blocks = int(self.kv_cache_mib * 2**20 // (bytes_per_token * self.block_size))
        if blocks < 1:
            raise ConfigError(f"scheduler.kv_cache_mib = {self.kv_cache_mib} holds no block of {self.block_size} "
                              f"tokens ({bytes_per_token * self.block_size / 2**20:.2f} MiB each); raise it")
        return min(blocks, self.max_num_seqs * per_seq)
