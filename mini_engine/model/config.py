"""GPT-2 architecture hyper-parameters, readable from a Hugging Face config.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ModelNotFound

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    bos_token_id: int = 50256
    eos_token_id: int = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def num_parameters(self) -> int:
        """Parameters with the lm_head tied to the token embedding (counted once)."""
        d, L = self.n_embd, self.n_layer
        per_layer = 12 * d * d + 13 * d  # qkv, proj, mlp (4d) weights+biases, two LayerNorms
        return self.vocab_size * d + self.n_positions * d + L * per_layer + 2 * d

    def weight_bytes(self, dtype: str = "float32") -> int:
        return self.num_parameters * _DTYPE_BYTES.get(dtype, 4)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_json(cls, path: Path) -> "GPT2Config":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ModelNotFound(f"cannot read model config {path}: {e}") from None
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ModelNotFound(f"{path}: model_type '{model_type}' is not supported (only gpt2)")
        act = raw.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ModelNotFound(f"{path}: activation_function '{act}' is not supported (gelu_new)")
        return cls(
            vocab_size=raw.get("vocab_size", 50257),
            n_positions=raw.get("n_positions", raw.get("n_ctx", 1024)),
            n_embd=raw.get("n_embd", 768),
            n_layer=raw.get("n_layer", 12),
            n_head=raw.get("n_head", 12),
            layer_norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
            bos_token_id=raw.get("bos_token_id", 50256) or 50256,
            eos_token_id=raw.get("eos_token_id", 50256) or 50256,
        )


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    # A few-layer model with GPT-2's vocabulary, for fast tests.
    "tiny": GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256),
}
