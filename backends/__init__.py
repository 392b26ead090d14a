"""Backends shipped with mini-engine (installed as `mini_engine_backends`).

Each subpackage exposes one Runner subclass through the entry-point group
`mini_engine.backends`; importing a subpackage must not import its runtime
library (torch, onnxruntime, tensorrt): that happens in `load()`.
"""
