"""TensorRT runner: a plan built from the ONNX export, two profiles, KV cache kept on the device.

Each phase has its own execution context, bound once to its optimization
profile (context = prefill, generation = decode), so a step never switches
profiles. The KV cache follows the export's past-in/present-out contract in
two device buffers per tensor used ping-pong: step k reads past from one side
and TensorRT writes present to the other. Rows are gathered with device copies
when the set of active slots changes; a slot left out of a step is released.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mini_engine.devices import cuda_unavailable_reason, module_installed, package_version
from mini_engine.errors import BackendUnavailable, ConfigError, MiniEngineError
from mini_engine.runner import Availability, Runner, StepInput

TRT_DISTS = ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12", "tensorrt-cu11")


@dataclass
class TensorRTOptions:
    plan: str = ""  # a .plan from `mini-engine export tensorrt`; empty = build from the model and cache it
    cache_dir: str = ""  # default $MINI_ENGINE_CACHE or ~/.cache/mini-engine
    memory: str = "auto"  # device memory through pycuda (auto: when installed) or torch
    # Used when the plan is built on first use:
    max_batch: int = 16
    max_seq: int = 0  # 0 = the model's context window
    opt_batch: int = 1
    workspace_gb: float = 4.0
    timing_cache: str = ""

    def __post_init__(self):
        from .memory import CHOICES

        if self.memory not in CHOICES:
            raise ConfigError(f"backend.options.memory must be one of {', '.join(CHOICES)}, got '{self.memory}'")
        if self.max_batch < 1 or self.opt_batch < 1 or self.max_seq < 0:
            raise ConfigError("backend.options.max_batch/opt_batch must be >= 1 and max_seq >= 0")
        if not self.workspace_gb > 0:
            raise ConfigError("backend.options.workspace_gb must be > 0")


def row_runs(current: Sequence[int], wanted: Sequence[int]) -> list[tuple[int, int, int]]:
    """Copies (dst_row, src_row, count) that put the rows holding `wanted` slots first, in order.

    Consecutive rows that stay consecutive are merged into one copy.
    """
    where = {s: i for i, s in enumerate(current)}
    missing = [s for s in wanted if s not in where]
    if missing:
        raise MiniEngineError(f"slot {missing[0]} has no KV cache in the tensorrt runner (slots released when "
                              f"left out of a step, or never prefilled)")
    runs: list[list[int]] = []
    for dst, slot in enumerate(wanted):
        src = where[slot]
        if runs and runs[-1][1] + runs[-1][2] == src:
            runs[-1][2] += 1
        else:
            runs.append([dst, src, 1])
    return [tuple(r) for r in runs]


class TensorRTRunner(Runner):
    name = "tensorrt"
    supported_devices = ("cuda",)
    Options = TensorRTOptions

    @classmethod
    def availability(cls) -> Availability:
        version = package_version(*TRT_DISTS)
        reasons = []
        if not module_installed("tensorrt"):
            reasons.append("TensorRT is not installed (pip install 'mini-engine[gpu]', which pins tensorrt>=10,<11)")
        elif version and int(version.split(".")[0]) != 10:
            reasons.append(f"TensorRT {version} is installed; this backend is written for TensorRT 10 "
                           f"(pip install 'tensorrt>=10,<11')")
        no_gpu = cuda_unavailable_reason()
        if no_gpu:
            reasons.append(no_gpu)
        if reasons:
            return Availability(False, "; ".join(reasons), cls.supported_devices, version)
        return Availability(True, None, cls.supported_devices, version)

    # ----- lifecycle -----------------------------------------------------------
    def _load_impl(self) -> None:
        import tensorrt as trt

        from mini_engine_export.tensorrt_meta import check_target, current_target, read_metadata
        from mini_engine_export.tensorrt_profiles import Profile

        from .memory import make_memory

        self.trt = trt
        self.device_index = int(self.config.device.partition(":")[2] or 0)
        plan = self._plan_path()
        meta = read_metadata(plan)
        check_target(plan, meta, current_target(self.device_index))
        fingerprint = meta["model"].get("fingerprint")
        if fingerprint and fingerprint != self.config.model.fingerprint():
            raise ConfigError(f"TensorRT plan '{plan}' was built from model {meta['model'].get('spec')!r}, not "
                              f"{self.config.model.spec!r}; pass the matching --model or rebuild the plan")
        self.meta, self.plan = meta, plan
        self.profiles = [Profile.from_dict(p) for p in meta["profiles"]]
        self.memory = make_memory(self.options.memory, self.device_index)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        self.engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BackendUnavailable(f"TensorRT could not deserialize '{plan}' (its messages are above); "
                                     f"rebuild it with `mini-engine export tensorrt --out {plan} --force`")
        if self.engine.num_optimization_profiles != len(self.profiles):
            raise BackendUnavailable(f"'{plan}' has {self.engine.num_optimization_profiles} optimization profiles, "
                                     f"its metadata {len(self.profiles)}; rebuild it")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.contexts = []
        for index in range(len(self.profiles)):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(index, self.memory.stream_handle)
            self.contexts.append(ctx)
        self.memory.synchronize()
        self.kv: list[dict[str, Any]] = []

    def _plan_path(self) -> Path:
        if self.options.plan:
            return Path(self.options.plan).expanduser()
        from mini_engine_export.tensorrt_cache import cached_plan

        return cached_plan(self.config.model, self.config.dtype, self.options, self.device_index)

    def _close_impl(self) -> None:
        self.contexts, self.kv, self.staging = [], [], {}
        self.engine = self._runtime = self.logits = self._pinned = self._kv_geometry = None
        self.memory.close()

    # ----- KV cache --------------------------------------------------------------
    def _allocate_kv_impl(self, num_slots: int, max_seq_len: int) -> None:
        s = self.meta["settings"]
        if num_slots > s["max_batch"] or max_seq_len > s["max_seq"]:
            raise MiniEngineError(
                f"TensorRT plan '{self.plan}' takes batches up to {s['max_batch']} and sequences up to "
                f"{s['max_seq']} tokens; this batch needs {num_slots} x {max_seq_len}: lower "
                f"batching.max_batch_size / generation.max_new_tokens or rebuild with larger --max-batch/--max-seq")
        cfg = self.config.model.config
        geometry = (num_slots, max_seq_len)
        if getattr(self, "_kv_geometry", None) != geometry:
            self.kv = []
            row = cfg.n_head * max_seq_len * cfg.head_dim
            for _side in range(2):
                self.kv.append({n: self.memory.alloc(num_slots * row * self.dtypes[n].itemsize)
                                for n in self.inputs if n.startswith("past_key_values.")})
            self.staging = {n: self.memory.alloc(num_slots * max_seq_len * 8)
                            for n in ("input_ids", "position_ids", "attention_mask")}
            self.logits = self.memory.alloc(0)
            self._kv_geometry = geometry
        self.rows: list[int] = []
        self.length = 0
        self.side = 0  # which buffer holds the cache for the next step's past

    def _free_kv_impl(self) -> None:
        self.rows, self.length = [], 0  # buffers stay for a batch of the same geometry

    # ----- execution ---------------------------------------------------------------
    def _execute_impl(self, step: StepInput) -> np.ndarray:
        from mini_engine_export.tensorrt_profiles import select_profile

        b, t, past = step.batch_size, step.seq_len, step.past_len
        index = select_profile(self.profiles, b, t, past)
        ctx, mem = self.contexts[index], self.memory
        if past:
            if past != self.length:
                raise MiniEngineError(f"the tensorrt runner's cache holds {self.length} positions, the step says "
                                      f"past_len={past}")
            if list(step.slot_ids) != self.rows:
                self._gather(list(step.slot_ids), past)
        cfg = self.config.model.config
        for name in ("input_ids", "position_ids", "attention_mask"):
            host = np.ascontiguousarray(getattr(step, name), dtype=self.dtypes[name])
            mem.upload(self.staging[name], host)
            self._bind(ctx, name, host.shape, self.staging[name])
        for name, buf in self.kv[self.side].items():
            self._bind(ctx, name, (b, cfg.n_head, past, cfg.head_dim), buf)
            present = "present." + name[len("past_key_values."):]
            ctx.set_tensor_address(present, self.kv[1 - self.side][name].ptr)
        vocab, itemsize = cfg.vocab_size, self.dtypes["logits"].itemsize
        need = b * t * vocab * itemsize
        if self.logits.nbytes < need:
            self.logits = mem.alloc(need)
        ctx.set_tensor_address("logits", self.logits.ptr)
        if not ctx.execute_async_v3(mem.stream_handle):
            raise MiniEngineError("TensorRT execute_async_v3 failed (its messages are above)")
        if step.logits == "all" or t == 1:
            out = self._host_logits((b, t, vocab))
            mem.download(out, self.logits)
        else:
            out = self._host_logits((b, 1, vocab))
            for r in range(b):  # the last position of each row
                mem.download(out[r], self.logits, ((r * t) + t - 1) * vocab * itemsize)
        mem.synchronize()
        self.side, self.rows, self.length = 1 - self.side, list(step.slot_ids), past + t
        out = out.astype(np.float32, copy=True)
        return out[:, -1] if step.logits == "last" else out

    @staticmethod
    def _bind(ctx, name: str, shape, buf) -> None:
        if not ctx.set_input_shape(name, tuple(shape)):
            raise MiniEngineError(f"TensorRT refused shape {list(shape)} for input '{name}' (outside the profile?)")
        ctx.set_tensor_address(name, buf.ptr)

    def _host_logits(self, shape) -> np.ndarray:
        """A page-locked host array for logits, reused while large enough (pinning is slow)."""
        dtype = self.dtypes["logits"]
        need = int(np.prod(shape))
        if getattr(self, "_pinned", None) is None or self._pinned.size < need:
            self._pinned = self.memory.host_empty((need,), dtype)
        return self._pinned[:need].reshape(shape)

    def _gather(self, wanted: list[int], past: int) -> None:
        """Copy the rows of `wanted` slots, in order, to the other side, which becomes current."""
        cfg = self.config.model.config
        src, dst = self.kv[self.side], self.kv[1 - self.side]
        runs = row_runs(self.rows, wanted)
        for name, buf in src.items():
            row = cfg.n_head * past * cfg.head_dim * self.dtypes[name].itemsize  # contiguous [b, H, past, D]
            for d, s, n in runs:
                self.memory.copy(dst[name], d * row, buf, s * row, n * row)
        self.side, self.rows = 1 - self.side, wanted

    def describe(self) -> dict:
        info = super().describe()
        if self.is_loaded:
            info.update({"tensorrt": self.trt.__version__, "plan": str(self.plan), "memory": self.memory.name,
                         "precision": self.meta.get("precision"), "settings": self.meta.get("settings")})
        return info
