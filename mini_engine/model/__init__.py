"""Model definitions: architecture shapes and sources (no torch at import time)."""
from .config import GPT2Config, PRESETS
from .source import ModelSource, resolve_model

__all__ = ["GPT2Config", "PRESETS", "ModelSource", "resolve_model"]
