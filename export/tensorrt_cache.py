"""Plans built on first use: `--backend tensorrt --model M` without a prebuilt plan.

The ONNX export and the plan go into a cache directory ($MINI_ENGINE_CACHE or
~/.cache/mini-engine, or backend.options.cache_dir), the plan keyed by the
ONNX bytes, the profiles, the precision, the GPU and the TensorRT version, so
a change to any of them builds a new plan instead of loading a stale one.
"""
from __future__ import annotations

import os
from pathlib import Path

from mini_engine.errors import ConfigError
from mini_engine.model.source import ModelSource

from .tensorrt_build import BuildOptions, build_plan, file_sha256, model_meta, plan_key
from .tensorrt_meta import current_target, meta_path
from .tensorrt_profiles import ProfileSettings

PLAN_FILE = "model.plan"


def cache_root(option: str = "") -> Path:
    return Path(option or os.environ.get("MINI_ENGINE_CACHE") or "~/.cache/mini-engine").expanduser()


def settings_from_options(source: ModelSource, options) -> ProfileSettings:
    max_batch = options.max_batch
    return ProfileSettings(max_batch=max_batch, max_seq=options.max_seq or source.config.n_positions,
                           opt_batch=min(options.opt_batch, max_batch)).validate(source.config)


def onnx_for(source: ModelSource, dtype: str, root: Path, log=lambda s: None) -> tuple[Path, str, str]:
    """(ONNX file, its precision, its sha256) for `source`, exporting into the cache when needed."""
    if source.kind == "onnx":
        from .manifest import Manifest

        manifest = Manifest.read(source.path)
        if manifest is not None and manifest.logits != "all":
            # The runner and the parity check read every position's logits from the engine.
            raise ConfigError(f"'{source.spec}' was exported with --logits {manifest.logits}; TensorRT plans are "
                              f"built from exports with every position's logits: re-export it with "
                              f"`mini-engine export onnx --logits all`")
        precision = manifest.precision if manifest else "float32"
        recorded = (manifest.data.get("sha256", {}) if manifest else {}).get(source.onnx_file.name)
        return source.onnx_file, precision, recorded or file_sha256(source.onnx_file)
    from .onnx_export import export_onnx

    precision = "float16" if dtype == "float16" else "float32"
    out = root / "onnx" / f"{source.fingerprint()}-{precision}"
    result = export_onnx(source, out, fp16=precision == "float16", log=log, cache=True)
    recorded = result.manifest.data.get("sha256", {}).get(result.model_file.name)
    return result.model_file, precision, recorded or file_sha256(result.model_file)


def cached_plan(source: ModelSource, dtype: str, options, device_index: int = 0, log=lambda s: None) -> Path:
    """The plan for `source` on this GPU, built into the cache on first use."""
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"the tensorrt backend runs float32 or float16, not {dtype}")
    root = cache_root(options.cache_dir)
    settings = settings_from_options(source, options)
    onnx, precision, onnx_sha = onnx_for(source, dtype, root, log)
    build = BuildOptions(fp16=dtype == "float16", workspace_gb=options.workspace_gb,
                         timing_cache=Path(options.timing_cache).expanduser() if options.timing_cache else None,
                         device_index=device_index)
    plan = root / "tensorrt" / plan_key(onnx_sha, settings, build, current_target(device_index)) / PLAN_FILE
    if not (plan.is_file() and meta_path(plan).is_file()):
        build_plan(onnx, plan, source.config, model_meta(source), settings, build, onnx_precision=precision, log=log)
    return plan
