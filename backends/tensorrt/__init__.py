"""TensorRT backend (implementation lands with the GPU issue)."""
from mini_engine.runner import NotImplementedRunner


class TensorRTRunner(NotImplementedRunner):
    name = "tensorrt"
    supported_devices = ("cuda",)
    planned_in = "TensorRT engine export + backend issue"
