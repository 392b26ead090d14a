"""Build the engine's GPT-2 module from a ModelSource (imports torch)."""
from __future__ import annotations

import json

import torch

from ..errors import ConfigError, ModelNotFound
from .gpt2 import GPT2, init_random_
from .source import ModelSource

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Hugging Face's GPT-2 stores these as Conv1D, i.e. [in, out]; nn.Linear wants [out, in].
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return TORCH_DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype '{name}' (choose: {', '.join(TORCH_DTYPES)})") from None


def build_model(source: ModelSource, dtype: str = "float32", device: str = "cpu") -> GPT2:
    """The GPT-2 module in eval mode with weights from `source`, on `device`."""
    if source.kind == "onnx":
        raise ConfigError(
            f"'{source.spec}' is an ONNX export: run it with --backend onnxruntime, or give the torch "
            f"backend the checkpoint or random:<preset> it was exported from")
    model = GPT2(source.config)
    if source.is_random:
        init_random_(model, source.seed)
    else:
        _load_state(model, _read_hf_state_dict(source))
    return model.to(device=device, dtype=torch_dtype(dtype)).eval().requires_grad_(False)


def _read_hf_state_dict(source: ModelSource) -> dict[str, torch.Tensor]:
    path = source.path
    try:
        if (path / "model.safetensors").is_file():
            from safetensors.torch import load_file

            return load_file(str(path / "model.safetensors"))
        index = path / "model.safetensors.index.json"
        if index.is_file():
            from safetensors.torch import load_file

            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(load_file(str(path / shard)))
            return state
        # weights_only=True refuses pickled code: a checkpoint cannot run anything on load.
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except ModelNotFound:
        raise
    except Exception as e:
        raise ModelNotFound(f"cannot read weights from '{source.spec}': {type(e).__name__}: {e}") from None


def _load_state(model: GPT2, hf_state: dict[str, torch.Tensor]) -> None:
    state = {}
    for key, tensor in hf_state.items():
        name = key[len("transformer."):] if key.startswith("transformer.") else key
        if name.endswith(_IGNORED_SUFFIXES) and not name.endswith("c_attn.bias"):
            continue  # causal-mask buffers of old checkpoints; lm_head is tied to wte
        if name.endswith(_CONV1D):
            tensor = tensor.t()
        state[name] = tensor.float().contiguous()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelNotFound(f"checkpoint does not match a GPT-2 of this config: {detail}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ModelNotFound(
                f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                f"config expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
