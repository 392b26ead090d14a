"""TensorRT backend: runs a plan built from the ONNX export (TensorRT 10 API)."""
from .runner import TensorRTOptions, TensorRTRunner

__all__ = ["TensorRTRunner", "TensorRTOptions"]
