"""The metadata JSON written beside every TensorRT plan, and the check made before loading one.

A serialized TensorRT engine only runs on the GPU model (compute capability)
and TensorRT version it was built with; loading it elsewhere fails deep inside
TensorRT or, worse, runs slowly with tactics tuned for another chip. The
metadata records where the plan was built so that a mismatch is one clear
error that says how to rebuild.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mini_engine.errors import BackendUnavailable, ModelNotFound

FORMAT_VERSION = 1


def meta_path(plan: Path) -> Path:
    """`model.plan` -> `model.plan.json`."""
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


@dataclass(frozen=True)
class BuildTarget:
    """The GPU and TensorRT version a plan is built for (or that would load it)."""

    gpu_name: str
    compute_capability: str  # "9.0"
    tensorrt_version: str

    def to_dict(self) -> dict[str, str]:
        return {"gpu_name": self.gpu_name, "compute_capability": self.compute_capability,
                "tensorrt_version": self.tensorrt_version}


def gpu_identity(device_index: int = 0) -> tuple[str, str]:
    """(name, compute capability) of a CUDA device, through PyTorch or else pycuda."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device_index)
        return props.name, f"{props.major}.{props.minor}"
    try:
        import pycuda.driver as cuda
    except ImportError:
        raise BackendUnavailable("no CUDA device visible to PyTorch and pycuda is not installed") from None
    cuda.init()
    dev = cuda.Device(device_index)
    major, minor = dev.compute_capability()
    return dev.name(), f"{major}.{minor}"


def current_target(device_index: int = 0) -> BuildTarget:
    import tensorrt as trt

    name, cc = gpu_identity(device_index)
    return BuildTarget(name, cc, trt.__version__)


def build_metadata(*, target: BuildTarget, plan: Path, plan_sha256: str, onnx: Path, onnx_sha256: str,
                   model: dict[str, Any], precision: dict[str, Any], settings: dict[str, int],
                   profiles: list[dict[str, Any]], workspace_gb: float, build_seconds: float) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "gpu": {"name": target.gpu_name, "compute_capability": target.compute_capability},
        "tensorrt_version": target.tensorrt_version,
        "plan": {"file": Path(plan).name, "sha256": plan_sha256, "size": Path(plan).stat().st_size},
        "source_onnx": {"path": str(onnx), "sha256": onnx_sha256},
        "model": model,
        "precision": precision,
        "settings": settings,
        "profiles": profiles,
        "workspace_gb": workspace_gb,
        "build_seconds": round(build_seconds, 2),
    }


def write_metadata(plan: Path, meta: dict[str, Any]) -> Path:
    path = meta_path(plan)
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_metadata(plan: Path) -> dict[str, Any]:
    plan, path = Path(plan), meta_path(plan)
    if not plan.is_file():
        raise ModelNotFound(f"TensorRT plan '{plan}' does not exist; build one with "
                            f"`mini-engine export tensorrt --out {plan}`")
    if not path.is_file():
        raise ModelNotFound(f"TensorRT plan '{plan}' has no metadata ({path.name}) beside it, so where it was "
                            f"built is unknown; rebuild it with `mini-engine export tensorrt --out {plan} --force`")
    try:
        meta = json.loads(path.read_text())
        missing = [k for k in ("gpu", "tensorrt_version", "plan", "profiles", "source_onnx", "model") if k not in meta]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelNotFound(f"{path} is not valid TensorRT plan metadata ({type(e).__name__}: {e}); rebuild with "
                            f"`mini-engine export tensorrt --out {plan} --force`") from None
    if plan.stat().st_size != meta["plan"].get("size"):
        raise ModelNotFound(f"TensorRT plan '{plan}' is {plan.stat().st_size} bytes but its metadata says "
                            f"{meta['plan'].get('size')} (truncated or replaced?); rebuild with "
                            f"`mini-engine export tensorrt --out {plan} --force`")
    return meta


def rebuild_hint(plan: Path, meta: dict[str, Any]) -> str:
    onnx = meta.get("source_onnx", {}).get("path") or "DIR"
    s = meta.get("settings", {})
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in s.items() if k in ("max_batch", "max_seq", "opt_batch"))
    fp16 = " --fp16" if meta.get("precision", {}).get("fp16") else ""
    return f"mini-engine export tensorrt --onnx {onnx} --out {plan}{fp16} {flags} --force".replace("  ", " ")


def check_target(plan: Path, meta: dict[str, Any], here: BuildTarget) -> None:
    """Refuse a plan built for another GPU or TensorRT version, saying how to rebuild it."""
    built = BuildTarget(meta["gpu"].get("name", "?"), meta["gpu"].get("compute_capability", "?"),
                        meta["tensorrt_version"])
    diffs = []
    if built.tensorrt_version != here.tensorrt_version:
        diffs.append(f"TensorRT {built.tensorrt_version} (here: {here.tensorrt_version})")
    if built.compute_capability != here.compute_capability or built.gpu_name != here.gpu_name:
        diffs.append(f"{built.gpu_name}, compute capability {built.compute_capability} "
                     f"(here: {here.gpu_name}, {here.compute_capability})")
    if diffs:
        raise BackendUnavailable(f"TensorRT plan '{plan}' was built for {' and '.join(diffs)}; plans only run "
                                 f"where they were built: rebuild it on this machine with "
                                 f"`{rebuild_hint(plan, meta)}`")
