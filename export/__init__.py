"""Export pipeline (installed as `mini_engine_export`): ONNX and TensorRT."""
