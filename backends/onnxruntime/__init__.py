"""ONNX Runtime backend: runs the graph `mini-engine export onnx` writes (CPU, CUDA, TensorRT providers)."""
from .runner import OrtOptions, OrtRunner

__all__ = ["OrtRunner", "OrtOptions"]
