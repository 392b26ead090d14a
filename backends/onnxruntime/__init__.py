"""ONNX Runtime backend (implementation lands with the ONNX export issue)."""
from mini_engine.runner import NotImplementedRunner


class OrtRunner(NotImplementedRunner):
    name = "onnxruntime"
    supported_devices = ("cpu", "cuda")
    planned_in = "ONNX export + ONNX Runtime backend issue"
