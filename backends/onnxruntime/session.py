"""Creating ONNX Runtime sessions: providers, session options, and errors users can act on.

Imported only from `OrtRunner._load_impl`, so listing backends never imports onnxruntime.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from mini_engine.errors import BackendUnavailable, ConfigError, ModelNotFound

LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def device_type(device: str) -> tuple[str, int]:
    """('cpu', 0) or ('cuda', N) for IO binding."""
    kind, _, index = device.partition(":")
    return kind, int(index or 0)


def choose_providers(requested: list[str], device: str) -> list[str]:
    """The provider list for `device`, checked against what this onnxruntime build has."""
    import onnxruntime as ort

    kind, _ = device_type(device)
    providers = list(requested) or (["CUDAExecutionProvider", "CPUExecutionProvider"] if kind == "cuda"
                                    else ["CPUExecutionProvider"])
    known = set(ort.get_all_providers())
    unknown = [p for p in providers if p not in known]
    if unknown:
        raise ConfigError(f"backend.options.providers: unknown execution provider '{unknown[0]}' "
                          f"(e.g. CPUExecutionProvider, CUDAExecutionProvider, TensorrtExecutionProvider)")
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        hint = "install onnxruntime-gpu instead of onnxruntime (pip install mini-engine[gpu])" \
            if missing[0] in GPU_PROVIDERS else "use a build of onnxruntime that includes it"
        raise BackendUnavailable(f"execution provider {missing[0]} is not installed in onnxruntime "
                                 f"{ort.__version__} (available: {', '.join(available)}); {hint}")
    on_gpu = providers[0] in GPU_PROVIDERS
    if on_gpu != (kind == "cuda"):
        raise ConfigError(f"backend.options.providers starts with {providers[0]} but backend.device is "
                          f"'{device}'; use --device {'cuda' if on_gpu else 'cpu'} or change the providers")
    return providers


def session_options(opts, spinning: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = opts.intra_op_threads
    so.inter_op_num_threads = opts.inter_op_threads
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[opts.graph_optimization_level])
    so.log_severity_level = 3  # warnings about unused initializers etc. are noise to a user
    flag = "1" if spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", flag)
    so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return so


def resolve_spinning(setting: str) -> bool:
    """`auto`: spin (ORT's default, lowest latency) unless PyTorch lives in this process, whose
    own thread pool would then compete for the same cores."""
    if setting == "auto":
        return "torch" not in sys.modules
    return setting == "on"


def provider_options(providers: list[str], device: str, opts, cfg, cache_root: Path, precision: str) -> list[dict]:
    _, index = device_type(device)
    out = []
    for p in providers:
        if p == "CUDAExecutionProvider":
            out.append({"device_id": index})
        elif p == "TensorrtExecutionProvider":
            out.append(trt_provider_options(index, opts, cfg, cache_root, precision))
        else:
            out.append({})
    return out


def trt_provider_options(index: int, opts, cfg, cache_root: Path, precision: str) -> dict:
    """One optimisation profile covering prefill and decode up to the configured limits."""
    max_b = opts.trt_max_batch_size
    max_s = opts.trt_max_seq_len or cfg.n_positions
    h, d = cfg.n_head, cfg.head_dim

    def shapes(b: int, t: int, p: int) -> str:
        items = [f"input_ids:{b}x{t}", f"position_ids:{b}x{t}", f"attention_mask:{b}x{p + t}"]
        items += [f"past_key_values.{i}.{kv}:{b}x{h}x{p}x{d}" for i in range(cfg.n_layer) for kv in ("key", "value")]
        return ",".join(items)

    cache = Path(opts.trt_engine_cache or cache_root / "tensorrt").expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    return {"device_id": index, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
            "trt_fp16_enable": opts.trt_fp16 or precision == "float16",
            "trt_profile_min_shapes": shapes(1, 1, 0),
            "trt_profile_opt_shapes": shapes(max(1, max_b // 2), 1, max_s // 2),
            "trt_profile_max_shapes": shapes(max_b, max_s, max_s - 1)}


def create_session(path: Path | bytes, so, providers: list[str], provider_opts: list[dict]):
    """A session for a model file (or serialized model bytes) on exactly the first provider asked for."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=providers, provider_options=provider_opts)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if any(k in first for k in ("Protobuf parsing failed", "INVALID_PROTOBUF", "Load model from", "ModelProto")):
            raise ModelNotFound(f"cannot load '{path}': not a valid ONNX model ({first[:200]}); "
                                f"re-export with `mini-engine export onnx --force`") from None
        raise BackendUnavailable(f"onnxruntime cannot create a session for '{path}' with "
                                 f"{', '.join(providers)}: {first[:300]}") from None
    active = session.get_providers()
    if active[0] != providers[0]:
        raise BackendUnavailable(f"onnxruntime could not start {providers[0]} (it fell back to {active[0]}); "
                                 f"check the CUDA/cuDNN/TensorRT libraries onnxruntime-gpu needs "
                                 f"(LD_LIBRARY_PATH)")
    return session


def cache_root(option: str) -> Path:
    root = option or os.environ.get("MINI_ENGINE_CACHE") or "~/.cache/mini-engine"
    return Path(root).expanduser()
