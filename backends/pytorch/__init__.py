"""PyTorch backend: the engine's GPT-2 module, eager, on CPU or CUDA."""
from .runner import TorchOptions, TorchRunner

__all__ = ["TorchRunner", "TorchOptions"]
