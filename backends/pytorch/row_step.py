"""Batch-1 decode on CPU in float32: one row, one new token, run in numpy over OpenBLAS.

A batch-1 decode step of GPT-2 small streams ~500 MB of linear weights for ~0.25 GFLOP,
so it is bound by how fast those weights are read, and then by per-call overhead:

- numpy's OpenBLAS GEMV reads the weights at ~17-26 GB/s on the Zen 4 CPUs this project
  is measured on, against ~11-13 for MKL's GEMV (`F.linear`) and ~13-19 for oneDNN with
  prepacked weights (benchmarks/linear_kernels_bench.py). It reads fastest over a K-major
  copy of a weight with at least as many outputs as inputs, and over the [N, K] weight
  (not transposed) where a layer has fewer outputs, as the MLP's down projection does.
- The ~30 small ops per layer (layer norms, attention over the cache, GELU, residuals) cost
  ~1 µs each in numpy against ~5-10 µs through torch's dispatcher: ~1.5-2 ms per step
  instead of ~4-7 ms, when the GEMVs take ~20 ms.
- Mixing the two in one step costs more: torch's OpenMP workers and OpenBLAS's spin on
  the same two cores. Here no torch op runs at all.

The math is `GPT2.step` for one row (pre-LN blocks, tanh GELU, causal attention over the
cache with padding keys masked); tests hold its logits to transformers' like the torch path.
It reads and writes the runner's KV buffers in place, so a sequence can move between this
path and batched torch steps at any time.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from mini_engine.model.gpt2 import GPT2


class Gemv:
    """y = x @ W.T + b for one row, over the weight layout OpenBLAS reads fastest."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        weight = weight.detach()
        self.n_major = weight.shape[0] < weight.shape[1]
        # [N, K] keeps the model's tensor alive (once replace_linears has packed it for oneDNN,
        # that is a second copy too); the K-major layout is always a copy.
        self.weight = (weight.contiguous() if self.n_major else weight.t().contiguous()).numpy()
        self.bias = None if bias is None else _np(bias)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.weight @ x if self.n_major else x @ self.weight
        if self.bias is not None:
            y += self.bias
        return y


class RowStep:
    """Runs one decode step for the sequence in row 0 of the KV buffers."""

    def __init__(self, model: GPT2, make_linear=None, lm_head=None):
        """`make_linear(module)` -> a numpy callable for one of the blocks' linear layers (default: a
        float32 Gemv over the nn.Linear's weight); `lm_head`: the callable for the tied lm_head
        (default: a float32 Gemv over the token embedding). int8 passes Int8Gemv for both."""
        cfg = model.cfg
        make = make_linear or (lambda m: Gemv(m.weight, m.bias))
        self.n_head, self.head_dim, self.eps = cfg.n_head, cfg.head_dim, cfg.layer_norm_epsilon
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.wte, self.wpe = _np(model.wte.weight), _np(model.wpe.weight)
        self.layers = [
            (_np(b.ln_1.weight), _np(b.ln_1.bias), make(b.attn.c_attn), make(b.attn.c_proj),
             _np(b.ln_2.weight), _np(b.ln_2.bias), make(b.mlp.c_fc), make(b.mlp.c_proj))
            for b in model.h]
        self.ln_f = (_np(model.ln_f.weight), _np(model.ln_f.bias))
        self.lm_head = lm_head or Gemv(model.wte.weight, None)
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def bind_cache(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """Use row 0 of the runner's [rows, H, S, D] buffers (numpy views, no copy)."""
        self.keys = [k[0].numpy() for k in keys]
        self.values = [v[0].numpy() for v in values]

    def __call__(self, token: int, position: int, past_len: int, attention_mask: np.ndarray) -> np.ndarray:
        """Logits [V] for `token` at `position`, appended to the bound cache at index `past_len`."""
        end = past_len + 1
        padding = np.flatnonzero(attention_mask[:end] <= 0)  # torch: keys with mask > 0

        def attend(i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            keys, values = self.keys[i], self.values[i]
            keys[:, past_len] = k
            values[:, past_len] = v
            scores = np.matmul(keys[:, :end], q[:, :, None])[:, :, 0]
            scores *= self.scale
            if padding.size:
                scores[:, padding] = _MASKED
            return np.matmul(_softmax_(scores)[:, None, :], values[:, :end]).reshape(-1)

        return self._forward(token, position, attend)

    def paged(self, token: int, position: int, kv) -> np.ndarray:
        """Logits [V] for one token of a paged step (`kv`: a PagedKV over the block pool)."""
        shape = (1, self.n_head, self.head_dim)

        def attend(i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
            return kv.attend_np(i, q.reshape(shape), k.reshape(shape), v.reshape(shape)).reshape(-1)

        return self._forward(token, position, attend)

    def _forward(self, token: int, position: int, attend) -> np.ndarray:
        x = self.wte[token] + self.wpe[position]
        for i, (w1, b1, qkv_proj, out_proj, w2, b2, fc, down) in enumerate(self.layers):
            q, k, v = qkv_proj(self._layer_norm(x, w1, b1)).reshape(3, self.n_head, self.head_dim)
            x = x + out_proj(attend(i, q, k, v))
            x = x + down(_gelu_tanh_(fc(self._layer_norm(x, w2, b2))))
        return self.lm_head(self._layer_norm(x, *self.ln_f))

    def _layer_norm(self, x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
        d = x - np.add.reduce(x) / x.size
        d *= weight / np.sqrt(np.dot(d, d) / d.size + self.eps)
        d += bias
        return d


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _softmax_(s: np.ndarray) -> np.ndarray:
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= np.add.reduce(s, axis=-1, keepdims=True)
    return s


_GELU_C = math.sqrt(2.0 / math.pi)
_MASKED = np.finfo(np.float32).min  # as additive_mask: finite, so a fully padded row stays NaN-free


def _gelu_tanh_(x: np.ndarray) -> np.ndarray:
    """GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in place on x."""
    t = x * x
    t *= 0.044715
    t *= x
    t += x
    t *= _GELU_C
    np.tanh(t, out=t)
    t += 1.0
    x *= t
    x *= 0.5
    return x
