"""Quantized Linear layers for the torch backend on CPU (model.dtype int8 / int4).

int8 (W8A8, dynamic, per-row):
- weights: int8, symmetric, one float32 scale per output channel (absmax / 127 of each row of
  the [N, K] weight), prepacked once for oneDNN;
- activations: quantized at run time, one scale per row (per token: absmax / 127 of that row),
  stored as uint8 with a fixed zero point of 128;
- oneDNN's u8 x s8 -> s32 GEMM (`torch.ops.onednn.qlinear_pointwise`, the kernel behind
  torch.compile's x86 int8 path), dequantized by the weight scales inside the kernel and by the
  row's scale after it, then the float32 bias.
The int32 sums are exact and every scale belongs to one row, so a row's result does not depend on
which other rows share its step: continuous batching gives the same logits (bit for bit in these
layers) as the same request alone. Per-tensor activation scales, as torch's own dynamic quantized
Linear (`torch.ao.nn.quantized.dynamic.Linear`, `quantized::linear_dynamic`) uses, would not: a
row's quantization would depend on the other rows' largest value.

Pre-VNNI x86 (AVX2 only, such as AMD Zen 3, or AVX-512 without VNNI) computes u8 x s8 products
with `vpmaddubsw`, which saturates the int16 sum of two products (255 x 127 x 2 > 32767). A probe
at load time runs the kernel on the worst case; where it saturates, activations use 7 bits
(|q| <= 63 stored with zero point 64, so every uint8 value is <= 127, as fbgemm's `reduce_range`),
which keeps every pair sum in range (127 x 127 x 2 < 32768) and the sums exact.

Batch-1 decode steps (one row, one token) run in numpy instead (row_step.py over Int8Gemv): the
same quantization and integer sums in a numba GEMV, ~1 us per call instead of torch's dispatcher.

int4 (weight-only, block-wise): weights as unsigned 4-bit values in blocks of `block_size` along K
with a bfloat16 scale and zero per block (w = (q - 8) * scale + zero), packed for
`torch._weight_int4pack_mm_for_cpu` (gpt-fast's CPU int4 kernel), which is fast only for bfloat16
activations: each layer's input is rounded to bfloat16 and its output returned as float32.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from numba import njit
from torch import nn

from mini_engine.errors import ConfigError

from .linears import bucket_rows, pad_rows, swap_linears

# Activations are stored as uint8 q + zero point, the zero point fixed per level count (never per
# batch): 128 for |q| <= 127; 64 for |q| <= 63, so every uint8 value is <= 127.
_ZERO_POINT = {127: 128, 63: 64}


@njit(nogil=True, cache=True, fastmath={"nnan", "ninf", "nsz"})
def quantize_rows(x, levels, zero_point, out, scales):
    """Per-row symmetric quantization of x [M, K] float32: scales[i] = max|x[i]| / levels,
    out[i] = rint(x[i] / scales[i]) + zero_point as uint8. One call instead of ~7 torch ops
    (~6-10 us against ~15-40 us per layer at one row); the same values as the torch expression
    torch.div(x, s).round_().add_(zero_point) with s = vector_norm(x, inf, 1).clamp_min(1e-30) / levels."""
    m, k = x.shape
    for i in range(m):
        amax = np.float32(0.0)
        for j in range(k):
            amax = max(amax, abs(x[i, j]))
        s = max(amax, np.float32(1e-30)) / levels
        scales[i, 0] = s
        for j in range(k):
            out[i, j] = np.uint8(np.rint(x[i, j] / s) + zero_point)


@njit(nogil=True, cache=True, fastmath={"nnan", "ninf", "nsz"})
def quantize_row_int8(x, levels, out) -> np.float32:
    """quantize_rows for one row [K], to int8 q (no zero point); returns the row's scale."""
    amax = np.float32(0.0)
    for j in range(x.shape[0]):
        amax = max(amax, abs(x[j]))
    s = max(amax, np.float32(1e-30)) / levels
    for j in range(x.shape[0]):
        out[j] = np.int8(np.rint(x[j] / s))
    return s


@njit(nogil=True, cache=True)
def finish_rows(y, scales, bias):
    """y[i, n] = y[i, n] * scales[i] + bias[n] in place: y holds the GEMM's int32 sums times the
    weight scales; the same float32 operations, in the same order, as gemv_w8a8's last line."""
    for i in range(y.shape[0]):
        s = scales[i, 0]
        for n in range(y.shape[1]):
            y[i, n] = y[i, n] * s + bias[n]


@njit(nogil=True, cache=True)
def gemv_w8a8(w, xq, w_scale, s, bias, out, lo, hi):
    """out[n] = float32(sum_k w[n, k] * xq[k]) * w_scale[n] * s + bias[n] for n in lo..hi-1: exact
    int32 sums over the int8 weights [N, K] (LLVM vectorizes the widening multiply-add for the
    host's ISA: AVX2's vpmaddwd, AVX-512's, VNNI's vpdpwssd; nothing assumes AVX-512)."""
    k = w.shape[1]
    for n in range(lo, hi):
        acc = np.int32(0)
        for j in range(k):
            # numba types int32 arithmetic as int64; truncating each step lets LLVM keep 32-bit lanes
            # (sign-extend to int16, multiply-add pairs): ~3x faster, the same exact sums.
            acc = np.int32(acc + np.int32(w[n, j]) * np.int32(xq[j]))
        out[n] = (np.float32(acc) * w_scale[n]) * s + bias[n]


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], float32 scales [N]): symmetric, per output channel."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


@functools.lru_cache(maxsize=None)
def activation_levels() -> int:
    """127 where oneDNN's u8 x s8 GEMM accumulates exactly at full range (VNNI), else 63."""
    k, n = 64, 16
    q = torch.full((n, k), 127, dtype=torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(q, [1, k])
    x = torch.full((1, k), 255, dtype=torch.uint8)  # the largest u8 x s8 products: 255 x 127
    y = torch.ops.onednn.qlinear_pointwise(x, 1.0, 128, packed, torch.ones(n), torch.zeros(n, dtype=torch.long),
                                           None, 1.0, 0, torch.float32, "none", [], "")
    return 127 if float(y[0, 0]) == 127.0 * 127.0 * k else 63


def int8_usable() -> str | None:
    """None when the int8 kernel runs here, else why not (one line)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.onednn, "qlinear_pointwise"):
        return f"int8 needs PyTorch's oneDNN int8 kernels (onednn.qlinear_pointwise), absent in torch {torch.__version__}"
    return None


class Int8Linear(nn.Module):
    """y = x @ W.T + b with int8 W (per-channel scales) and per-row dynamically quantized x."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, levels: int | None = None):
        super().__init__()
        q, scale = quantize_weight_int8(weight)
        self.out_features, self.in_features = q.shape
        levels = levels or activation_levels()
        self.levels, self.zero_point = float(levels), _ZERO_POINT[levels]
        self._levels, self._zero = np.float32(levels), np.float32(self.zero_point)
        self.w_scale = scale
        self.w_zero = torch.zeros(self.out_features, dtype=torch.long)
        self.has_bias = bias is not None
        # A zero bias where the layer has none (the lm_head): one code path, and + 0.0 changes nothing.
        self.bias = (bias.detach().float() if bias is not None else torch.zeros(self.out_features)).contiguous()
        self.packed = torch.ops.onednn.qlinear_prepack(q, [1, self.in_features])
        self.weight_int8 = q  # [N, K] for the batch-1 GEMV (Int8Gemv); dropped when that is off
        self.nbytes = q.numel() + 4 * scale.numel() + (4 * self.out_features if self.has_bias else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        # Per-row scale s = absmax / levels; q = round(x / s) in [-levels, levels], stored + zero point.
        xq = torch.empty(x.shape, dtype=torch.uint8)
        s = torch.empty((x.shape[0], 1))
        quantize_rows(np.ascontiguousarray(x.numpy()), self._levels, self._zero, xq.numpy(), s.numpy())
        m = x.shape[0]
        rows = bucket_rows(m)  # bounded shapes, bounded oneDNN memory (linears.EXACT_ROWS); pads are zeros
        xq, s = pad_rows(xq, rows, self.zero_point), pad_rows(s, rows)
        y = torch.ops.onednn.qlinear_pointwise(xq, 1.0, self.zero_point, self.packed, self.w_scale, self.w_zero, None,
                                               1.0, 0, torch.float32, "none", [], "")
        finish_rows(y.numpy(), s.numpy(), self.bias.numpy())
        return y[:m].view(*shape[:-1], self.out_features)


# Below this many weights a layer's GEMV runs on one thread: the hand-off costs more than it saves.
MIN_SPLIT_WEIGHTS = 1 << 20
_POOLS: dict = {}


class Int8Gemv:
    """Int8Linear for one row in numpy (the batch-1 row step, row_step.py): the same quantization,
    exact int32 sums and float32 finish as the oneDNN path, so a row gets the same values alone in
    a batch-1 step as beside other rows in a batched one, and no torch op runs."""

    def __init__(self, layer: Int8Linear, threads: int = 1):
        self.w = layer.weight_int8.numpy()
        self.w_scale, self.bias = layer.w_scale.numpy(), layer.bias.numpy()
        self.levels = layer._levels
        self.xq = np.empty(layer.in_features, np.int8)
        n = layer.out_features
        self.shares = threads if threads > 1 and self.w.size >= MIN_SPLIT_WEIGHTS else 1
        self.edges = [n * i // self.shares for i in range(self.shares + 1)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        s = np.float32(quantize_row_int8(x, self.levels, self.xq))  # numba returns a Python float
        out = np.empty(self.w.shape[0], np.float32)
        args = (self.w, self.xq, self.w_scale, s, self.bias, out)
        if self.shares == 1:
            gemv_w8a8(*args, 0, self.w.shape[0])
            return out
        pool = _pool(self.shares)
        futures = [pool.submit(gemv_w8a8, *args, self.edges[i], self.edges[i + 1]) for i in range(1, self.shares)]
        gemv_w8a8(*args, self.edges[0], self.edges[1])
        for f in futures:
            f.result()
        return out


def _pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor

    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads - 1, thread_name_prefix="int8-gemv")
    return _POOLS[threads]


def quantize_weight_int4(weight: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int32 [N, K] of 0..15, [K / block, N, 2] float32 scale and zero)."""
    w = weight.detach().float()
    n, k = w.shape
    blocks = w.view(n, k // block_size, block_size)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-12) / 15.0
    q = torch.clamp(torch.round((blocks - lo) / scale), 0, 15).to(torch.int32).view(n, k)
    zero = lo + 8.0 * scale  # the kernel computes (q - 8) * scale + zero
    scale_zero = torch.stack([scale.view(n, -1), zero.view(n, -1)], dim=-1).transpose(0, 1).contiguous()
    return q, scale_zero


def int4_usable() -> str | None:
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return (f"torch {torch.__version__} has no CPU int4 kernel (_weight_int4pack_mm_for_cpu); "
                f"int4 is available on the onnxruntime backend")
    return None


class Int4Linear(nn.Module):
    """y = x @ W.T + b with W as block-wise asymmetric 4-bit values; x stays float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, block_size: int):
        super().__init__()
        n, k = weight.shape
        if n % 16:
            raise ConfigError(f"int4 needs a layer's outputs to be a multiple of 16, got {n}")
        if k % block_size:
            raise ConfigError(f"backend.options.int4_block_size {block_size} does not divide a layer's {k} inputs")
        q, scale_zero = quantize_weight_int4(weight, block_size)
        self.scale_zero = scale_zero.bfloat16()
        self.out_features, self.in_features, self.block_size = n, k, block_size
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.nbytes = n * k // 2 + 2 * self.scale_zero.numel() + (0 if self.bias is None else 4 * n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # bfloat16 in: the kernel's float32 path is a reference loop (~35x slower here).
        y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).bfloat16(), self.packed,
                                              self.block_size, self.scale_zero).float()
        if self.bias is not None:
            y = y.add_(self.bias)
        return y.view(*shape[:-1], self.out_features)


def quantize_model(model: nn.Module, dtype: str, lm_head: bool, block_size: int = 32) -> dict:
    """Swap the blocks' nn.Linear layers (and, if `lm_head`, the tied lm_head) for quantized ones.

    The token embedding stays float32 for the lookup; a quantized lm_head is its own int8 copy.
    Returns what describe() records.
    """
    levels = activation_levels()
    make = (lambda w, b: Int8Linear(w, b, levels)) if dtype == "int8" else (lambda w, b: Int4Linear(w, b, block_size))
    count = swap_linears(model, make)
    head_kind = "float32 (oneDNN)"
    if lm_head:
        head = Int8Linear(model.wte.weight, None, levels)
        head_kind = "int8 W8A8, per-channel weight scales, per-row activation scales"
    else:
        from .linears import CpuLinear, onednn_usable

        head = CpuLinear(model.wte.weight, None) if onednn_usable() else None
    if head is not None:
        model.lm_head = head.forward  # a callable, not a submodule (see GPT2.lm_head)
        model._cpu_lm_head = [head]
    if dtype == "int8":
        layers = {"precision": "int8", "scheme": "W8A8 dynamic (weights int8, activations int8 per row)",
                  "weight_granularity": "per output channel, symmetric (absmax / 127)",
                  "activation_granularity": f"per row (token), symmetric, {8 if levels == 127 else 7} bits "
                                            f"(|q| <= {levels}), dynamic",
                  "kernel": "oneDNN u8s8s32 GEMM (torch.ops.onednn.qlinear_pointwise), prepacked weights"}
    else:
        layers = {"precision": "int4", "scheme": "weight-only (layer inputs rounded to bfloat16, outputs float32)",
                  "weight_granularity": f"blocks of {block_size} along K, asymmetric (bfloat16 scale and zero "
                                        f"per block)",
                  "kernel": "torch._weight_int4pack_mm_for_cpu"}
    return {**layers, "layers_quantized": count, "lm_head": head_kind, "kv_cache": "float32"}


def step_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter as stored, the lm_head as it runs.

    As the float32 figure (GPT2Config.weight_bytes) counts them: the position embedding whole, the
    token embedding once, as the lm_head (int8 when that is quantized, else float32).
    """
    total = 0
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            total += module.nbytes
        else:
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False)
                         if p is not model.wte.weight)
    head = getattr(model, "_cpu_lm_head", [None])[0]
    return total + (head.nbytes if isinstance(head, Int8Linear) else model.wte.weight.numel() * 4)
