"""PyTorch runner: pre-allocated per-slot KV cache, logits for the last position only."""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mini_engine.devices import cuda_unavailable_reason, module_installed, package_version
from mini_engine.errors import BackendUnavailable, ConfigError, MiniEngineError
from mini_engine.runner import Availability, Runner, StepInput


@dataclass
class TorchOptions:
    threads: int = 0  # intra-op threads (and the numpy row step's BLAS threads); 0 = the libraries' default
    # How fp32 Linear layers run on CPU: "onednn" prepacks weights for oneDNN,
    # which streams weights faster than MKL's GEMV on this class of CPU;
    # "aten" is plain torch.nn.functional.linear. "auto" picks onednn on CPU.
    linear: str = "auto"
    # CPU float32: steps with a single row and token (batch-1 decode) run in numpy, with
    # OpenBLAS GEMVs over a second copy of the weights laid out for GEMV, which streams
    # them faster than oneDNN or MKL here (row_step.py). "off" keeps one copy of the weights.
    gemv: str = "auto"
    # CUDA: decode steps replay CUDA graphs captured per bucketed batch size
    # up to cuda_graph_max_batch; enforce_eager turns that off.
    enforce_eager: bool = False
    cuda_graph_max_batch: int = 64
    # model.dtype int8 / int4 (CPU): whether the tied lm_head (50257 x 768 for GPT-2, the largest
    # matrix) is quantized too (int8 W8A8, as the blocks' layers are for int8), or kept float32.
    # "auto" quantizes it: ~4x fewer bytes per step for its cost in accuracy (int8_linear.py).
    lm_head: str = "auto"
    # model.dtype int4: weights in blocks of this many inputs, a scale and zero each.
    int4_block_size: int = 32
    # CPU float32, continuous batching: Megatron-style split of the model over this many ranks
    # (rank 0 is this process, the others are spawned; gloo over 127.0.0.1). See tensor_parallel/.
    tensor_parallel_size: int = 1
    # Every collective of a tensor-parallel step gives up after this long (a stuck or dead rank).
    tp_timeout_s: float = 60.0
    # How the ranks sum and gather: "shm" (shared memory, spinning waits; gloo for large tensors)
    # or "gloo" only. Measured in result/cpu/tp/.
    tp_comm: str = "shm"
    # Continuous batching: how attention reads the KV block pool. "kernel" is the numba kernel that
    # reads the blocks in place (CPU, float32 KV: float32, int8, int4 weights); "torch" gathers each
    # step's blocks and runs torch's attention (any device and float dtype; paged_sdpa.py). "auto":
    # the kernel where it runs, else torch on CPU (bfloat16); on CUDA "auto" keeps static batching
    # with CUDA graphs, the measured path, until the torch path is measured on a GPU.
    paged_attention: str = "auto"

    def __post_init__(self):
        if self.threads < 0:
            raise ConfigError("backend.options.threads must be >= 0")
        if self.cuda_graph_max_batch < 1:
            raise ConfigError("backend.options.cuda_graph_max_batch must be >= 1")
        if self.linear not in ("auto", "aten", "onednn"):
            raise ConfigError(f"backend.options.linear must be auto, aten or onednn, got '{self.linear}'")
        if self.gemv not in ("auto", "blas", "off"):
            raise ConfigError(f"backend.options.gemv must be auto, blas or off, got '{self.gemv}'")
        if self.lm_head not in ("auto", "quantized", "float32"):
            raise ConfigError(f"backend.options.lm_head must be auto, quantized or float32, got '{self.lm_head}'")
        if self.int4_block_size not in (32, 64, 128, 256):
            raise ConfigError(f"backend.options.int4_block_size must be 32, 64, 128 or 256, got {self.int4_block_size}")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"backend.options.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tp_comm not in ("shm", "gloo"):
            raise ConfigError(f"backend.options.tp_comm must be shm or gloo, got '{self.tp_comm}'")
        if self.paged_attention not in ("auto", "kernel", "torch"):
            raise ConfigError(f"backend.options.paged_attention must be auto, kernel or torch, "
                              f"got '{self.paged_attention}'")
        if not self.tp_timeout_s > 0:
            raise ConfigError(f"backend.options.tp_timeout_s must be > 0, got {self.tp_timeout_s}")


class TorchRunner(Runner):
    name = "torch"
    supported_devices = ("cpu", "cuda")
    Options = TorchOptions
    supports_paged = True

    @classmethod
    def availability(cls) -> Availability:
        version = package_version("torch")
        if not module_installed("torch"):
            return Availability(False, "PyTorch is not installed (pip install torch)", (), None)
        devices = ("cpu",) if cuda_unavailable_reason() else ("cpu", "cuda")
        return Availability(True, None, devices, version)

    # ----- lifecycle -------------------------------------------------------
    def _load_impl(self) -> None:
        import torch

        from mini_engine.model.weights import build_model, torch_dtype

        self.torch = torch
        self.tp = None  # TensorParallelGroup when tensor_parallel_size > 1
        if self.options.tensor_parallel_size > 1:
            return self._load_tensor_parallel()
        device = self.config.device
        quantized = self.config.dtype in ("int8", "int4")
        if quantized:
            self._check_quantized(device)
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BackendUnavailable(
                    f"device '{device}' requested but PyTorch sees no CUDA device "
                    f"(torch {torch.__version__}; is this a CPU build?)")
        elif self.config.dtype == "float16":
            raise ConfigError("float16 on CPU is not supported by the torch backend; use float32 or bfloat16")
        self.paged_path, self.paged_reason = self._choose_paged_path(device)
        if self.options.gemv == "blas" and (device != "cpu" or self.config.dtype != "float32"):
            raise ConfigError("backend.options.gemv = 'blas' needs device cpu and dtype float32; use 'auto'")
        # int8 / int4 quantize the linear weights only: embeddings, layer norms, activations between
        # the layers and the KV cache stay float32.
        self.dtype = torch.float32 if quantized else torch_dtype(self.config.dtype)
        self.model = build_model(self.config.model, "float32" if quantized else self.config.dtype, device)
        self.quantization = None  # what int8_linear.quantize_model did (describe())
        if quantized:
            from .int8_linear import quantize_model, step_weight_bytes

            self.quantization = quantize_model(self.model, self.config.dtype, self.options.lm_head != "float32",
                                               self.options.int4_block_size)
            self.quantization["weight_bytes_per_step"] = step_weight_bytes(self.model)
        self.row_step = None  # RowStep for batch-1 decode (CPU float32 and int8)
        if self.config.dtype == "int8" and self.options.gemv != "off":
            self.row_step = self._int8_row_step()
        elif quantized:
            self._drop_int8_copies()
        if device == "cpu" and self.config.dtype == "float32":
            from .linears import replace_linears
            from .row_step import RowStep

            if self.options.gemv != "off":
                self.row_step = RowStep(self.model)  # before replace_linears drops the nn.Linear weights
            if self.options.linear != "aten":
                replace_linears(self.model)
        self.keys: list = []
        self.values: list = []
        self.graphs = None  # DecodeGraphs over the current KV buffers (CUDA only)
        # Last, so a failed load leaves the process's thread settings alone; close() restores them.
        self.threads_before = torch.get_num_threads()
        self.blas_limit = None
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
            if self.row_step is not None:
                from threadpoolctl import ThreadpoolController

                # The numpy row step runs on numpy's BLAS threads: keep them within the same budget.
                self.blas_limit = ThreadpoolController().limit(limits=self.options.threads, user_api="blas")

    def _load_tensor_parallel(self) -> None:
        """Start the ranks; this process becomes rank 0 and runs with cores / tp threads."""
        from .tensor_parallel import TensorParallelGroup, cpu_cores

        torch, tp, cfg = self.torch, self.options.tensor_parallel_size, self.config.model.config
        if self.config.device != "cpu":
            raise ConfigError("backend.options.tensor_parallel_size > 1 runs on CPU only (gloo ranks over the "
                              "paged KV pool); CUDA keeps one process per GPU")
        if self.config.dtype != "float32":
            raise ConfigError(f"tensor parallelism runs float32 only, not {self.config.dtype}; "
                              f"use dtype float32 or tensor_parallel_size 1")
        if cfg.n_head % tp:
            raise ConfigError(f"backend.options.tensor_parallel_size {tp} must divide the model's "
                              f"{cfg.n_head} attention heads")
        if self.options.paged_attention == "torch":
            raise ConfigError("tensor parallel ranks read the KV pool with the numba kernel; "
                              "use backend.options.paged_attention = 'auto' or 'kernel'")
        if self.options.gemv == "blas":
            raise ConfigError("backend.options.gemv = 'blas' is the one-process batch-1 path; "
                              "with tensor_parallel_size > 1 use 'auto'")
        if self.options.tp_comm == "shm" and platform.machine().lower() not in ("x86_64", "amd64"):
            # shm.py orders its data and flag stores by x86's total store order alone
            raise ConfigError(f"backend.options.tp_comm = 'shm' relies on x86-64 store ordering, and this CPU "
                              f"is {platform.machine()}; use tp_comm = 'gloo'")
        threads = self.options.threads or max(1, cpu_cores() // tp)
        self.paged_path, self.paged_reason = "kernel", None
        self.model = self.row_step = self.graphs = self.blas_limit = self.quantization = None
        self.keys, self.values = [], []
        self.threads_before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            self.tp = TensorParallelGroup(self.config.model, tp, threads, self.options.linear,
                                          self.options.tp_timeout_s, self.options.tp_comm)
        except BaseException:
            torch.set_num_threads(self.threads_before)
            raise

    def health_problem(self) -> str | None:
        """Why this runner cannot run steps any more (a tensor-parallel rank died), or None."""
        return self.tp.health_problem() if self.tp is not None else None

    def _int8_row_step(self):
        """Batch-1 decode in numpy over int8 GEMVs (Int8Gemv: the oneDNN path's math, no torch op)."""
        from .int8_linear import Int8Gemv, Int8Linear
        from .row_step import RowStep

        threads = self.options.threads or self.torch.get_num_threads()
        head = self.model._cpu_lm_head[0]
        if isinstance(head, Int8Linear):
            head = Int8Gemv(head, threads)
        else:  # a float32 lm_head (option lm_head = float32): OpenBLAS over the token embedding
            head = None
        step = RowStep(self.model, lambda m: Int8Gemv(m, threads), head)
        self._drop_int8_copies()  # the GEMVs hold numpy views of them; the layers need them no more
        return step

    def _drop_int8_copies(self) -> None:
        from .int8_linear import Int8Linear

        for m in list(self.model.modules()) + list(getattr(self.model, "_cpu_lm_head", [])):
            if isinstance(m, Int8Linear):
                m.weight_int8 = None

    def _check_quantized(self, device: str) -> None:
        """int8 / int4 run on CPU only; refuse anything else in one line before loading weights."""
        from .int8_linear import int4_usable, int8_usable

        dtype = self.config.dtype
        if device != "cpu":
            raise ConfigError(f"dtype {dtype} on {device} is not supported by the torch backend (int8/int4 run "
                              f"on CPU); on CUDA use float16 or bfloat16")
        problem = int8_usable() if dtype == "int8" or self.options.lm_head != "float32" else None
        problem = problem or (int4_usable() if dtype == "int4" else None)
        if problem:
            raise ConfigError(problem)

    def _close_impl(self) -> None:
        if self.tp is not None:
            self.tp.close()
            self.tp = None
            self.torch.set_num_threads(self.threads_before)
            return
        # Thread settings are process-wide: give them back as they were.
        if self.blas_limit is not None:
            self.blas_limit.restore_original_limits()
        if self.options.threads:
            self.torch.set_num_threads(self.threads_before)
        self.model = self.graphs = self.row_step = self.blas_limit = None
        self.keys, self.values = [], []

    # ----- KV cache ----------------------------------------------------------
    def _allocate_kv_impl(self, num_slots: int, max_seq_len: int) -> None:
        from .cuda_graphs import DecodeGraphs, bucket_for, graph_buckets

        if self.tp is not None:
            raise MiniEngineError("tensor parallelism runs the continuous-batching (paged) path only, "
                                  "not static batching")
        cfg = self.config.model.config
        buckets = graph_buckets(self.options.cuda_graph_max_batch) if self._use_graphs else ()
        # With graphs, rows up to the bucket above num_slots exist as padding.
        rows = bucket_for(num_slots, buckets) or num_slots
        shape = (rows, cfg.n_head, max_seq_len, cfg.head_dim)
        if self.keys and tuple(self.keys[0].shape) == shape:
            pass  # same geometry as the last batch: reuse the buffers (and graphs)
        else:
            self.keys = self.values = []
            self.graphs = None
            # Graphs attend over the whole length: unwritten positions must hold finite values.
            alloc = self.torch.zeros if buckets else self.torch.empty
            self.keys = [alloc(shape, dtype=self.dtype, device=self.config.device) for _ in range(cfg.n_layer)]
            self.values = [alloc(shape, dtype=self.dtype, device=self.config.device) for _ in range(cfg.n_layer)]
            if buckets:
                self.graphs = DecodeGraphs(self.model, self.keys, self.values, buckets)
            if self.row_step is not None:
                self.row_step.bind_cache(self.keys, self.values)
        # Row r of every buffer holds slot layout[r]; steps run on the first n rows.
        self.layout = list(range(num_slots))

    def _free_kv_impl(self) -> None:
        # Buffers stay for reuse by a batch of the same geometry; close() drops them.
        self.layout = []

    # ----- paged KV pool (continuous batching) ----------------------------------------
    def _choose_paged_path(self, device: str) -> tuple[str | None, str | None]:
        """(path, None) for the paged-attention path this runner takes, or (None, why static batching)."""
        choice, dtype = self.options.paged_attention, self.config.dtype
        kernel_ok = device == "cpu" and dtype in ("float32", "int8", "int4")  # int8/int4: KV stays float32
        if choice == "kernel" and not kernel_ok:
            raise ConfigError(f"backend.options.paged_attention = 'kernel' is the CPU float32-KV kernel, not "
                              f"{dtype} on {device}; use 'torch' (or 'auto')")
        if choice == "kernel" or (choice == "auto" and kernel_ok):
            return "kernel", None
        if choice == "auto" and device != "cpu":
            return None, ("the torch backend keeps static batching with CUDA graphs on CUDA by default (the "
                          "measured path); backend.options.paged_attention = 'torch' runs continuous batching "
                          "there, not yet measured on a GPU")
        return "torch", None

    def paged_unsupported_reason(self) -> str | None:
        return getattr(self, "paged_reason", "the runner is not loaded")

    @property
    def preferred_block_size(self) -> int:
        # The numba kernel reads a block's tokens in address order and then jumps to the row's next
        # block, which lies anywhere in the pool. 128-token blocks (384 KB of K per layer at GPT-2
        # small) make the jumps rare: 16 rows at context 1000 attend in 42-46 ms instead of 55-60
        # with 16-token blocks (result/cpu/paged_kernel_probe.md). The torch-ops path gathers
        # whole blocks, so it keeps small ones: a row's last block is copied in full.
        return 128 if getattr(self, "paged_path", None) == "kernel" else 16

    def _allocate_kv_pool_impl(self, num_blocks: int, block_size: int, max_num_seqs: int) -> None:
        if self.tp is not None:
            return self.tp.allocate(num_blocks, block_size)
        cfg = self.config.model.config
        # allocate_pool's argument order; the kernel's pool is token-major, paged_sdpa's head-major
        shape = (cfg.n_layer, num_blocks, cfg.n_head, block_size, cfg.head_dim)
        if self.paged_path == "torch":
            from .paged_sdpa import allocate_pool_tensors

            self.pool_keys, self.pool_values = allocate_pool_tensors(*shape, self.dtype, self.config.device)
        else:
            from .paged_attention import allocate_pool

            self.pool_keys, self.pool_values = allocate_pool(*shape)
        self.kernel_threads = self.options.threads or self.torch.get_num_threads()

    def _free_kv_pool_impl(self) -> None:
        if self.tp is not None:
            return self.tp.free()
        self.pool_keys = self.pool_values = []

    def _execute_paged_impl(self, step) -> np.ndarray:
        from .paged_attention import PagedKV

        if self.tp is not None:
            return self.tp.execute(step)
        if self.paged_path == "torch":
            return self._execute_torch_paged(step)
        torch = self.torch
        cfg = self.config.model.config
        kv = PagedKV(self.pool_keys, self.pool_values, step, cfg.n_head, cfg.head_dim, self.kernel_threads)
        if self.row_step is not None and step.num_tokens == 1:
            logits = self.row_step.paged(int(step.input_ids[0]), int(step.position_ids[0]), kv)[None]
            return logits[:len(step.logits_rows)]  # a one-token prefill chunk that is not the prompt's end
        with torch.inference_mode():
            logits = self.model.paged_step(torch.from_numpy(step.input_ids), torch.from_numpy(step.position_ids),
                                           kv, torch.from_numpy(step.logits_indices))
        return logits.numpy()

    def _execute_torch_paged(self, step) -> np.ndarray:
        from .paged_sdpa import TorchPagedKV

        torch, dev = self.torch, self.config.device
        kv = TorchPagedKV(self.pool_keys, self.pool_values, step, self.config.model.config.head_dim)
        ids, pos, rows = (torch.from_numpy(a).to(dev) for a in (step.input_ids, step.position_ids,
                                                                   step.logits_indices))
        with torch.inference_mode():
            logits = self.model.paged_step(ids, pos, kv, rows)
        return logits.cpu().numpy()

    # ----- execution -----------------------------------------------------------
    def _execute_impl(self, step: StepInput) -> np.ndarray:
        torch = self.torch
        from mini_engine.model.gpt2 import BufferKV

        n = self._bring_to_front(step.slot_ids)
        if self.graphs is not None and self.graphs.handles(step):
            return self.graphs.run(step)
        if self.row_step is not None and n == 1 and step.seq_len == 1:
            logits = self.row_step(int(step.input_ids[0, 0]), int(step.position_ids[0, 0]), step.past_len,
                                   step.attention_mask[0])
            return logits[None] if step.logits == "last" else logits[None, None]
        dev = self.config.device
        ids = torch.from_numpy(step.input_ids).to(dev)
        pos = torch.from_numpy(step.position_ids).to(dev)
        mask = torch.from_numpy(step.attention_mask).to(dev)
        kv = BufferKV([k[:n] for k in self.keys], [v[:n] for v in self.values], step.past_len)
        with torch.inference_mode():
            logits = self.model.step(ids, pos, mask, kv, last_only=step.logits == "last")
        return logits.cpu().numpy()

    def _bring_to_front(self, slot_ids: Sequence[int]) -> int:
        """Make rows 0..n-1 hold `slot_ids` in order; copies only when the set changes."""
        n = len(slot_ids)
        wanted = list(slot_ids)
        if self.layout[:n] == wanted:
            return n
        chosen = set(wanted)
        new_layout = wanted + [s for s in self.layout if s not in chosen]
        perm = self.torch.tensor([self.layout.index(s) for s in new_layout], device=self.config.device)
        for buf in self.keys + self.values:
            rows = buf[:len(perm)]  # padding rows (CUDA graphs) stay where they are
            rows.copy_(rows.index_select(0, perm))
        self.layout = new_layout
        return n

    def describe(self) -> dict:
        info = super().describe()
        if self.is_loaded:
            info["threads"] = self.torch.get_num_threads()
            info["torch"] = self.torch.__version__
            info["gemv"] = ("off" if self.row_step is None else
                            "int8 numba GEMV (W8A8 per row, as the oneDNN path)" if self.config.dtype == "int8"
                            else "blas")
            info["paged"] = self.paged_unsupported_reason() or (
                "numba paged-attention kernel over the KV block pool" if self.paged_path == "kernel" else
                "torch ops: each step gathers its rows' blocks of the KV pool, then attention")
            info["cuda_graphs"] = self.graphs.describe() if self.graphs is not None else None
            if self.quantization is not None:
                info["quantization"] = dict(self.quantization)
            if self.tp is not None:
                info["gemv"] = "off (tensor parallel: the ranks run the torch path)"
                info["tensor_parallel"] = self.tp.describe()
        return info

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads, as stored: int8/int4 layers count their own bytes."""
        if self.is_loaded and self.quantization is not None:
            return self.quantization["weight_bytes_per_step"]
        return super().weight_bytes

    @property
    def _use_graphs(self) -> bool:
        return self.config.device.startswith("cuda") and not self.options.enforce_eager
