"""Build a TensorRT plan from this project's ONNX export (TensorRT 10 Python API).

`build_plan` parses the ONNX file with `OnnxParser.parse_from_file` (so
external data next to it is found), adds the context and generation
optimization profiles (tensorrt_profiles.py) and writes the serialized engine
plus its metadata (tensorrt_meta.py). `cached_plan` does the same on first use
for a model spec, in a cache keyed by everything that changes the engine.

Precision, and why the `gpu` extra pins tensorrt>=10,<11:
- fp32 ONNX, no --fp16: TensorRT's default (TF32 matmuls on Ampere and newer).
- fp32 ONNX with --fp16: weakly typed fp16 (`BuilderFlag.FP16`) with LayerNorm,
  softmax (and the mask add feeding it) and the logits kept in float32 through
  precision constraints; the KV-cache inputs/outputs become float16 so the
  cache takes half the memory. TensorRT 11 removed weak typing and this flag.
- fp16 ONNX (`mini-engine export onnx --fp16`): a strongly typed network whose
  precision is the ONNX graph's own; works on TensorRT 10 and 11.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mini_engine.errors import ConfigError, MiniEngineError
from mini_engine.model.config import GPT2Config

from .tensorrt_meta import BuildTarget, build_metadata, current_target, meta_path, write_metadata
from .tensorrt_profiles import ProfileSettings, compute_profiles, describe_profiles, settings_dict

# Layer types and ONNX node-name fragments kept in float32 in a weakly typed fp16 build.
FP32_LAYER_TYPES = ("NORMALIZATION", "SOFTMAX", "REDUCE")
FP32_NAME_HINTS = ("ln_", "layernorm", "layer_norm", "softmax")
LOGITS = "logits"


class ExportError(MiniEngineError):
    """Building a TensorRT engine failed; the message says what to change."""


@dataclass(frozen=True)
class BuildOptions:
    fp16: bool = False
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    device_index: int = 0

    def __post_init__(self):
        if not self.workspace_gb > 0:
            raise ConfigError(f"--workspace-gb must be > 0, got {self.workspace_gb}")


def typing_mode(trt_version: str, onnx_precision: str, fp16: bool) -> str:
    """'strong' (precision from the ONNX graph), 'weak-fp16' (BuilderFlag.FP16) or 'weak-fp32'."""
    major = int(trt_version.split(".")[0])
    if major < 10:
        raise ExportError(f"TensorRT {trt_version} is too old: this project uses the TensorRT 10 API "
                          f"(pip install 'tensorrt>=10,<11')")
    if onnx_precision == "float16":
        return "strong"
    if fp16 and major >= 11:
        raise ExportError(f"TensorRT {trt_version} has no weakly typed fp16 (BuilderFlag.FP16 was removed in 11): "
                          f"build from a float16 ONNX export (`mini-engine export onnx --fp16`) or install "
                          f"tensorrt>=10,<11")
    if major >= 11:
        return "strong"
    return "weak-fp16" if fp16 else "weak-fp32"


def keeps_fp32(layer_type: str, layer_name: str, outputs: Sequence[str]) -> bool:
    """Whether a layer stays float32 in a weakly typed fp16 build (numerically fragile parts)."""
    name = layer_name.lower()
    return (layer_type in FP32_LAYER_TYPES or any(h in name for h in FP32_NAME_HINTS)
            or LOGITS in outputs)


def _pin_fp32_layers(network, trt) -> int:
    """Constrain LayerNorm, softmax, the mask add before it and the logits to float32."""
    producer: dict[str, Any] = {}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    for layer in layers:
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
    chosen = {}
    for layer in layers:
        outs = [layer.get_output(j).name for j in range(layer.num_outputs)]
        if keeps_fp32(layer.type.name, layer.name, outs):
            chosen[layer.name] = layer
            # Softmax's input is scores + mask; the mask's large negative value overflows fp16.
            if layer.type.name in ("SOFTMAX",) or LOGITS in outs:
                for k in range(layer.num_inputs):
                    src = layer.get_input(k)
                    if src is not None and src.name in producer:
                        chosen[producer[src.name].name] = producer[src.name]
    floats = (trt.float32, trt.float16)
    pinned = 0
    for layer in chosen.values():
        outs = [j for j in range(layer.num_outputs) if layer.get_output(j).dtype in floats]
        if not outs:
            continue
        layer.precision = trt.float32
        for j in outs:
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def build_plan(onnx: Path, plan: Path, cfg: GPT2Config, model_meta: dict[str, Any], settings: ProfileSettings,
               options: BuildOptions, onnx_precision: str = "float32",
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Parse `onnx`, build the engine with both profiles, write `plan` and its metadata; return the metadata."""
    import tensorrt as trt

    onnx, plan = Path(onnx), Path(plan)
    profiles = compute_profiles(cfg, settings)
    mode = typing_mode(trt.__version__, onnx_precision, options.fp16)
    log(f"TensorRT {trt.__version__}: building {plan} from {onnx} ({mode.replace('-', ' ')} network)")
    log(describe_profiles(profiles))

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if mode == "strong" else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ExportError(f"TensorRT could not parse {onnx}: {errors[0] if errors else 'unknown error'}{more}")
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if inputs != set(profiles[0].shapes):
        raise ExportError(f"{onnx} does not follow the KV-cache I/O contract (inputs {sorted(inputs)[:4]}...); "
                          f"export it with `mini-engine export onnx`")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    pinned = 0
    if mode == "weak-fp16":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32_layers(network, trt)
        # The KV cache crosses the engine boundary every step: keep it in fp16.
        for tensor in [network.get_input(i) for i in range(network.num_inputs)] + \
                      [network.get_output(i) for i in range(network.num_outputs)]:
            if tensor.name.startswith(("past_key_values.", "present.")):
                tensor.dtype = trt.float16
            elif tensor.name == LOGITS:
                tensor.dtype = trt.float32
        log(f"fp16: {pinned} layers kept in float32 (LayerNorm, softmax and its mask add, logits)")
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    cache = None
    if options.timing_cache is not None:
        blob = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)

    target = current_target(options.device_index)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise ExportError("TensorRT failed to build the engine (its messages are above); a larger --workspace-gb "
                          "or a smaller --max-batch/--max-seq often helps")
    plan.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.with_name(plan.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(serialized)
    tmp.replace(plan)
    if options.timing_cache is not None:
        options.timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    meta = build_metadata(
        target=target, plan=plan, plan_sha256=file_sha256(plan), onnx=onnx, onnx_sha256=file_sha256(onnx),
        model=model_meta, precision={"fp16": mode == "weak-fp16" or onnx_precision == "float16",
                                     "mode": mode, "onnx_precision": onnx_precision, "fp32_layers": pinned},
        settings=settings_dict(settings), profiles=[p.to_dict() for p in profiles],
        workspace_gb=options.workspace_gb, build_seconds=seconds)
    write_metadata(plan, meta)
    log(f"wrote {plan} ({plan.stat().st_size / 1e6:.1f} MB) and {meta_path(plan).name} in {seconds:.1f} s")
    return meta


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def plan_key(onnx_sha256: str, settings: ProfileSettings, options: BuildOptions, target: BuildTarget) -> str:
    """Cache key of a plan: the ONNX bytes, the profiles, the precision, the GPU and TensorRT version."""
    blob = json.dumps({"onnx": onnx_sha256, "settings": settings_dict(settings), "fp16": options.fp16,
                       "workspace_gb": options.workspace_gb, "target": target.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_meta(source) -> dict[str, Any]:
    return {"spec": source.spec, "fingerprint": source.fingerprint(), "config": source.config.to_dict()}
