"""The engine's one GPT-2 forward, in PyTorch.

Every backend runs this definition: the PyTorch backend directly, ONNX Runtime
and TensorRT through its ONNX export. The KV cache is an explicit argument:
`ConcatKV` gives the stateless past-in/present-out contract used for export,
`BufferKV` writes into pre-allocated buffers so decoding never re-copies the
cache. Parameter names mirror Hugging Face's GPT-2 so checkpoints map 1:1.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPT2Config


class ConcatKV:
    """Stateless cache: present[i] = cat(past[i], new). The ONNX I/O contract."""

    def __init__(self, past: Sequence[tuple[torch.Tensor, torch.Tensor]] | None):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.past is not None:
            pk, pv = self.past[layer]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        self.present.append((k, v))
        return k, v


class BufferKV:
    """Pre-allocated cache views [B, H, S_max, D] per layer; appends in place."""

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], past_len: int):
        self.keys, self.values, self.past_len = keys, values, past_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.past_len + k.shape[2]
        kb, vb = self.keys[layer], self.values[layer]
        kb[:, :, self.past_len:end] = k
        vb[:, :, self.past_len:end] = v
        return kb[:, :, :end], vb[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, mask, kv, layer: int):
        b, t, d = x.shape
        if hasattr(kv, "attend"):
            # A paged cache ([1, N, d]: a ragged step's tokens, row after row) does its own
            # attention over each row's blocks; there is no mask. Widths come from n_head, which
            # under tensor parallelism is this rank's share of the heads.
            q, k, v = self.c_attn(x).view(t, 3, self.n_head, self.head_dim).unbind(1)
            return self.c_proj(kv.attend(layer, q, k, v).view(1, t, self.n_head * self.head_dim))
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (y.view(b, t, self.n_head, self.head_dim).transpose(1, 2) for y in (q, k, v))
        k, v = kv.update(layer, k, v)
        y = masked_attention(q, k, v, mask, self.scale)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, mask, kv, layer: int):
        x = x + self.attn(self.ln_1(x), mask, kv, layer)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        # A backend may swap in a faster lm_head (same tied weight); a plain
        # callable, not a submodule, so the state dict and exports are unchanged.
        self.lm_head = self.tied_lm_head

    def tied_lm_head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.wte.weight)

    def forward(self, input_ids, position_ids, attention_mask, past_key_values=None):
        """Stateless step (the export contract): returns logits [B,T,V] and presents."""
        kv = ConcatKV(past_key_values)
        logits = self.step(input_ids, position_ids, attention_mask, kv, last_only=False)
        return logits, kv.present

    def step(self, input_ids, position_ids, attention_mask, kv, last_only: bool = True):
        """One forward over `input_ids` with the cache in `kv` (ConcatKV or BufferKV)."""
        x = self.wte(input_ids) + self.wpe(position_ids)
        mask = additive_mask(attention_mask, input_ids.shape[1], x.dtype)
        for i, block in enumerate(self.h):
            x = block(x, mask, kv, i)
        if last_only:
            x = x[:, -1, :]
        return self.lm_head(self.ln_f(x)).float()


    def paged_step(self, input_ids, position_ids, kv, logits_indices):
        """A ragged step: input_ids/position_ids [N] (rows back to back), logits at logits_indices."""
        x = (self.wte(input_ids) + self.wpe(position_ids))[None]
        for i, block in enumerate(self.h):
            x = block(x, None, kv, i)
        return self.lm_head(self.ln_f(x[0, logits_indices])).float()


class LastPositionLogits(nn.Module):
    """GPT2.forward with logits for the final position only, as [B, 1, V].

    Rows are left-padded, so the final position is every row's newest token: all that
    generation and scoring read. Skipping the lm_head on the other positions saves
    2 x seq x 38.6M FLOPs per row and a [B, T, 50257] float32 output at prefill.
    """

    def __init__(self, model: GPT2):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids, attention_mask, past_key_values=None):
        kv = ConcatKV(past_key_values)
        logits = self.model.step(input_ids, position_ids, attention_mask, kv, last_only=True)
        return logits[:, None, :], kv.present


def masked_attention(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over [B, H, T, D] tensors, `mask` additive [B, 1, T, S]."""
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # On CPU the fused SDPA kernel with an explicit mask costs ~4 ms per decode step and layer
    # here; for GPT-2's short rows plain matmul + softmax is several times faster (and exports to
    # the same ONNX ops).
    att = torch.matmul(q, k.transpose(-1, -2)) * scale + mask
    return torch.matmul(att.softmax(dim=-1), v)


def additive_mask(attention_mask: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T, P+T] additive mask: causal over absolute positions, padding keys masked.

    A finite minimum (not -inf) keeps fully masked rows (left padding) free of NaN.
    """
    kv_len = attention_mask.shape[1]
    q_pos = torch.arange(q_len, device=attention_mask.device) + (kv_len - q_len)
    k_pos = torch.arange(kv_len, device=attention_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]
    allowed = causal[None, None, :, :] & (attention_mask[:, None, None, :] > 0)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, neg)


def init_random_(model: GPT2, seed: int) -> GPT2:
    """GPT-2's initialisation (normal 0.02, scaled residual projections), seeded."""
    gen = torch.Generator().manual_seed(seed)
    n_layer = model.cfg.n_layer
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".ln_" in name or name.startswith("ln_f"):
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                p.normal_(0.0, std, generator=gen)
    return model
