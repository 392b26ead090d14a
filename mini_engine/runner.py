"""The contract between the engine and a backend.

The engine owns scheduling, sampling and request bookkeeping; a runner owns
device memory (weights and KV cache) and executes model steps. Every step
names its inputs explicitly (token ids, position ids, attention mask, and the
KV-cache slots each row reads and appends to), so batching policy lives in the
engine and a runner never has to guess which sequence a row belongs to.

Two step contracts:
- `StepInput` (every runner): padded rows, one KV slot per sequence. The engine runs static
  batching over it.
- `PagedStep` (runners with `supports_paged`): a ragged, block-addressed step over a pool of
  fixed-size KV blocks (mini_engine.core.plan). The engine runs continuous batching over it.
CUDA graphs and tensor parallelism are private to a runner's `_impl` methods.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import numpy as np

from .core.plan import PagedStep
from .errors import BackendUnavailable, ConfigError, MiniEngineError
from .model.source import ModelSource


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and if not, why (a sentence a user can act on)."""

    available: bool
    reason: str | None = None
    devices: tuple[str, ...] = ()
    version: str | None = None


@dataclass
class RunnerConfig:
    model: ModelSource
    device: str = "cpu"
    dtype: str = "float32"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepInput:
    """One model step for a batch of rows.

    input_ids, position_ids: int64 [B, T]. attention_mask: int64 [B, past_len + T],
    1 for real tokens (left padding is 0). slot_ids: [B] KV-cache slots; row i
    attends over slot_ids[i]'s first past_len cached positions and appends T more.
    logits: "last" returns [B, V] for the final position, "all" returns [B, T, V].
    """

    input_ids: np.ndarray
    position_ids: np.ndarray
    attention_mask: np.ndarray
    slot_ids: Sequence[int]
    past_len: int
    logits: str = "last"

    @property
    def batch_size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


class Runner(abc.ABC):
    """Base class of every backend. Public methods validate; `_impl` methods work.

    Lifecycle: construct (cheap, validates options) -> load() (weights onto the
    device) -> allocate_kv() -> execute()* -> close(). Usable as a context manager.
    """

    #: Registry name (the entry-point name in `mini_engine.backends`).
    name: ClassVar[str] = "?"
    #: Devices the backend can target when its libraries are present.
    supported_devices: ClassVar[tuple[str, ...]] = ("cpu",)
    #: Dataclass describing the backend's `[backend.options]` keys, or None.
    Options: ClassVar[type | None] = None
    #: Whether the runner implements the paged contract (`allocate_kv_pool`, `execute_paged`).
    #: Runners without it still run: the engine falls back to static batching for them.
    supports_paged: ClassVar[bool] = False
    #: How a paged runner stores KV: "blocks" (a pool addressed by block tables and slot_mapping;
    #: prefix caching shares blocks) or "slots" (one contiguous row per sequence, keyed by
    #: PagedStep.seq_ids; no prefix caching, the engine sizes the pool as max_num_seqs windows).
    kv_layout: ClassVar[str] = "blocks"
    #: Tokens per KV block when `[scheduler] block_size` is left at 0 (auto): what this runner's
    #: attention reads fastest, as vLLM's platforms choose theirs (16 on CUDA; 128 in its Ascend and
    #: Gaudi plugins).
    preferred_block_size: int = 16

    def __init__(self, config: RunnerConfig):
        problem = self.device_problem(config.device)
        if problem:
            raise ConfigError(problem)
        self.config = config
        self.options = self.parse_options(config.options)
        self._loaded = False
        self._num_slots = 0
        self._max_seq_len = 0
        self._pool_blocks = 0
        self._block_size = 0

    # ----- discovery -------------------------------------------------------
    @classmethod
    def device_problem(cls, device: str) -> str | None:
        """Why `device` is never this backend's, or None. When the backend could not run here on
        any device (tensorrt on a CPU-only machine), that reason is what the user needs too."""
        if device.split(":")[0] in cls.supported_devices:
            return None
        message = f"backend '{cls.name}' does not support device '{device}' (supported: {', '.join(cls.supported_devices)})"
        avail = cls.availability()
        if not avail.available:
            message += f"; nor can it run on this machine: {avail.reason}"
        return message

    @classmethod
    def availability(cls) -> Availability:
        """Say whether this backend can run here without importing heavy libraries."""
        return Availability(True, devices=cls.supported_devices)

    @classmethod
    def parse_options(cls, raw: dict[str, Any]) -> Any:
        from .config import build_dataclass

        if cls.Options is None:
            if raw:
                raise ConfigError(f"backend '{cls.name}' takes no options (got: {', '.join(raw)})")
            return None
        return build_dataclass(cls.Options, raw, "backend.options")

    # ----- lifecycle -------------------------------------------------------
    def load(self) -> "Runner":
        if self._loaded:
            return self
        avail = self.availability()
        if not avail.available:
            raise BackendUnavailable(f"backend '{self.name}' is unavailable: {avail.reason}")
        self._load_impl()
        self._loaded = True
        return self

    def close(self) -> None:
        if self._loaded:
            self.free_kv()
            self.free_kv_pool()
            self._close_impl()
            self._loaded = False

    def __enter__(self) -> "Runner":
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def is_loaded(self) -> bool:
        return self._loaded

    # ----- KV cache --------------------------------------------------------
    def allocate_kv(self, num_slots: int, max_seq_len: int) -> None:
        """Reserve KV cache for `num_slots` sequences of up to `max_seq_len` tokens."""
        self._require_loaded()
        limit = self.config.model.config.n_positions
        if num_slots < 1:
            raise MiniEngineError(f"num_slots must be >= 1, got {num_slots}")
        if not 1 <= max_seq_len <= limit:
            raise MiniEngineError(f"max_seq_len must be in 1..{limit}, got {max_seq_len}")
        self._allocate_kv_impl(num_slots, max_seq_len)
        self._num_slots, self._max_seq_len = num_slots, max_seq_len

    def free_kv(self) -> None:
        if self._num_slots:
            self._free_kv_impl()
        self._num_slots = self._max_seq_len = 0

    def health_problem(self) -> str | None:
        """Why this runner cannot run steps any more (a worker process died, a device failed), or
        None. The engine asks after a step raises: a broken runner stops the engine (/health turns
        503); otherwise the failure is its requests' own and only they end."""
        return None

    # ----- paged KV pool (runners with supports_paged) -----------------------
    def paged_unsupported_reason(self) -> str | None:
        """None when this runner, as configured, can run paged steps; else why not."""
        return None if self.supports_paged else f"backend '{self.name}' implements only the static step contract"

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers (sizes the pool)."""
        cfg = self.config.model.config
        return 2 * cfg.n_layer * cfg.n_embd * (2 if self.config.dtype in ("float16", "bfloat16") else 4)

    def allocate_kv_pool(self, num_blocks: int, block_size: int, max_num_seqs: int = 0) -> None:
        """Reserve a pool of `num_blocks` KV blocks of `block_size` tokens each.

        `max_num_seqs`: the most sequences one step holds (a "slots" runner keeps a row each;
        0 = as many as the pool holds full context windows).
        """
        self._require_loaded()
        reason = self.paged_unsupported_reason()
        if reason:
            raise MiniEngineError(reason)
        if num_blocks < 1 or block_size < 1:
            raise MiniEngineError(f"the KV pool needs >= 1 block of >= 1 token, got {num_blocks} x {block_size}")
        self._allocate_kv_pool_impl(num_blocks, block_size, max_num_seqs)
        self._pool_blocks, self._block_size = num_blocks, block_size

    def free_kv_pool(self) -> None:
        if self._pool_blocks:
            self._free_kv_pool_impl()
        self._pool_blocks = self._block_size = 0

    def execute_paged(self, step: PagedStep) -> np.ndarray:
        """Run one ragged step; returns float32 logits [len(step.logits_rows), V].

        A step that raises must leave per-sequence state as it was (K/V written to the step's own
        slots may stay: a rerun writes them again): the engine then reruns halves of the step to
        find the request that fails and fails it alone."""
        self._require_loaded()
        self._validate_paged(step)
        return self._execute_paged_impl(step)

    def _validate_paged(self, step: PagedStep) -> None:
        if not self._pool_blocks:
            raise MiniEngineError("allocate_kv_pool() must be called before execute_paged()")
        n, b = step.num_tokens, step.num_rows
        if n < 1 or b < 1:
            raise MiniEngineError("a step needs at least one row and one token")
        if step.block_size != self._block_size:
            raise MiniEngineError(f"step block_size {step.block_size} != the pool's {self._block_size}")
        if step.position_ids.shape != (n,) or step.slot_mapping.shape != (n,) or step.query_start.shape != (b + 1,):
            raise MiniEngineError("position_ids and slot_mapping must have one entry per token, query_start B + 1")
        if step.slot_mapping.min() < 0 or step.slot_mapping.max() >= self._pool_blocks * self._block_size:
            raise MiniEngineError(f"slot_mapping must lie in 0..{self._pool_blocks * self._block_size - 1}")
        if step.block_tables.size and step.block_tables.max() >= self._pool_blocks:
            raise MiniEngineError(f"block tables must name blocks 0..{self._pool_blocks - 1}")
        self._check_ids(step.input_ids, step.position_ids)

    # ----- execution -------------------------------------------------------
    def execute(self, step: StepInput) -> np.ndarray:
        """Run one step; returns float32 logits ([B, V] or [B, T, V])."""
        self._require_loaded()
        self._validate_step(step)
        return self._execute_impl(step)

    def _validate_step(self, step: StepInput) -> None:
        b, t = step.input_ids.shape
        if t < 1 or b < 1:
            raise MiniEngineError("a step needs at least one row and one token")
        if step.position_ids.shape != (b, t):
            raise MiniEngineError(f"position_ids shape {step.position_ids.shape} != {(b, t)}")
        if step.attention_mask.shape != (b, step.past_len + t):
            raise MiniEngineError(
                f"attention_mask shape {step.attention_mask.shape} != {(b, step.past_len + t)}"
            )
        if len(step.slot_ids) != b:
            raise MiniEngineError(f"{len(step.slot_ids)} slot ids for {b} rows")
        if not self._num_slots:
            raise MiniEngineError("allocate_kv() must be called before execute()")
        if step.past_len + t > self._max_seq_len:
            raise MiniEngineError(
                f"step needs {step.past_len + t} KV positions; {self._max_seq_len} allocated"
            )
        if len(set(step.slot_ids)) != b or min(step.slot_ids) < 0 or max(step.slot_ids) >= self._num_slots:
            raise MiniEngineError(f"slot ids must be distinct and in 0..{self._num_slots - 1}")
        if step.logits not in ("last", "all"):
            raise MiniEngineError(f"logits must be 'last' or 'all', got {step.logits!r}")
        self._check_ids(step.input_ids, step.position_ids)

    def _check_ids(self, input_ids: np.ndarray, position_ids: np.ndarray) -> None:
        """Numpy indexing would wrap a negative id silently: refuse out-of-range ids in one line."""
        cfg = self.config.model.config
        if input_ids.min() < 0 or input_ids.max() >= cfg.vocab_size:
            raise MiniEngineError(f"token ids must be in 0..{cfg.vocab_size - 1}")
        if position_ids.min() < 0 or position_ids.max() >= cfg.n_positions:
            raise MiniEngineError(f"position ids must be in 0..{cfg.n_positions - 1}")

    def _require_loaded(self) -> None:
        if not self._loaded:
            raise MiniEngineError(f"runner '{self.name}' is not loaded; call load() first")

    # ----- facts the engine and benchmarks read ------------------------------
    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (for bandwidth-achieved figures)."""
        return self.config.model.config.weight_bytes(self.config.dtype)

    def describe(self) -> dict[str, Any]:
        """Backend-specific facts worth recording next to a benchmark (threads, providers...)."""
        info = {"backend": self.name, "device": self.config.device, "dtype": self.config.dtype}
        if self.options is not None:
            info["options"] = dataclasses.asdict(self.options)
        return info

    # ----- what a backend implements ----------------------------------------
    @abc.abstractmethod
    def _load_impl(self) -> None: ...

    def _close_impl(self) -> None:
        pass

    @abc.abstractmethod
    def _allocate_kv_impl(self, num_slots: int, max_seq_len: int) -> None: ...

    def _free_kv_impl(self) -> None:
        pass

    @abc.abstractmethod
    def _execute_impl(self, step: StepInput) -> np.ndarray: ...

    def _allocate_kv_pool_impl(self, num_blocks: int, block_size: int, max_num_seqs: int) -> None:  # pragma: no cover
        raise MiniEngineError(f"backend '{self.name}' does not implement the paged KV pool")

    def _free_kv_pool_impl(self) -> None:
        pass

    def _execute_paged_impl(self, step: PagedStep) -> np.ndarray:  # pragma: no cover
        raise MiniEngineError(f"backend '{self.name}' does not implement paged steps")


class NotImplementedRunner(Runner):
    """Placeholder for a registered backend name whose implementation has not landed."""

    planned_in = "a later release"

    @classmethod
    def availability(cls) -> Availability:
        return Availability(False, reason=f"not implemented yet (planned: {cls.planned_in})",
                            devices=cls.supported_devices)

    def _load_impl(self) -> None:  # pragma: no cover - load() refuses first
        raise BackendUnavailable(self.availability().reason)

    def _allocate_kv_impl(self, num_slots: int, max_seq_len: int) -> None:  # pragma: no cover
        raise BackendUnavailable(self.availability().reason)

    def _execute_impl(self, step: StepInput) -> np.ndarray:  # pragma: no cover
        raise BackendUnavailable(self.availability().reason)
