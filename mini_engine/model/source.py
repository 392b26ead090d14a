"""Resolve a `--model` value to something a runner can load.

Accepted: `random:<preset>` (seeded random weights, real shapes), a local
directory in Hugging Face format, a hub id found in the local Hugging Face
cache (this machine has no hub access, so nothing is downloaded), or an ONNX
export (a directory with `manifest.json`, or its `.onnx` file).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFound
from .config import PRESETS, GPT2Config

RANDOM_PREFIX = "random:"
RANDOM_SEED = 0
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
MANIFEST = "manifest.json"  # written beside every ONNX export (mini_engine_export.manifest)


@dataclass(frozen=True)
class ModelSource:
    spec: str  # what the user wrote
    kind: str  # "random" | "local" | "onnx"
    config: GPT2Config
    path: Path | None = None  # checkpoint directory for "local", export directory for "onnx"
    seed: int = RANDOM_SEED
    onnx_file: Path | None = None  # for "onnx": the graph
    origin_fingerprint: str | None = None  # for "onnx": fingerprint of the model it was exported from

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    @property
    def preset(self) -> str | None:
        return self.spec[len(RANDOM_PREFIX):] if self.is_random else None

    def fingerprint(self) -> str:
        """Identifies the weights: for caches keyed by model (exports, engines)."""
        if self.kind == "onnx" and self.origin_fingerprint:
            return self.origin_fingerprint
        h = hashlib.sha256(repr(self.config).encode())
        if self.is_random:
            h.update(f"{self.spec}:{self.seed}".encode())
        else:
            for name in WEIGHT_FILES + ("config.json",):
                f = self.path / name
                if f.exists():
                    st = f.stat()
                    h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def resolve_model(spec: str) -> ModelSource:
    spec = spec.strip()
    if not spec:
        raise ModelNotFound("empty model spec; use random:gpt2, a checkpoint directory or a hub id")
    if spec.startswith(RANDOM_PREFIX):
        name = spec[len(RANDOM_PREFIX):]
        if name not in PRESETS:
            raise ModelNotFound(
                f"unknown random model '{spec}'; choose one of: "
                + ", ".join(RANDOM_PREFIX + p for p in PRESETS)
            )
        return ModelSource(spec=spec, kind="random", config=PRESETS[name])

    path = Path(spec).expanduser()
    if path.suffix == ".onnx" or (path / MANIFEST).is_file():
        return _onnx_export(spec, path)
    if path.exists():
        return _local(spec, path)
    if spec.startswith((".", "/", "~")) or os.sep in spec.rstrip(os.sep) and spec.count("/") > 1:
        raise ModelNotFound(f"model directory '{spec}' does not exist")
    return _local(spec, _from_hf_cache(spec))


def _local(spec: str, path: Path) -> ModelSource:
    if not path.is_dir():
        raise ModelNotFound(f"'{spec}' is not a directory (expected a Hugging Face checkpoint directory)")
    if not (path / "config.json").is_file():
        raise ModelNotFound(f"'{spec}' has no config.json (expected a Hugging Face checkpoint directory)")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ModelNotFound(f"'{spec}' has no weights ({', '.join(WEIGHT_FILES)})")
    return ModelSource(spec=spec, kind="local", config=GPT2Config.from_hf_json(path / "config.json"), path=path)


def _onnx_export(spec: str, path: Path) -> ModelSource:
    """An export made by `mini-engine export onnx`: its manifest says what model it is."""
    if path.suffix == ".onnx":
        if not path.is_file():
            raise ModelNotFound(f"ONNX file '{spec}' does not exist")
        directory, onnx_file = path.parent, path
    else:
        directory, onnx_file = path, None
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        model = manifest["model"]
        config = GPT2Config(**model["config"])
        onnx_file = onnx_file or directory / manifest["files"]["model"]
    except FileNotFoundError:
        raise ModelNotFound(
            f"'{spec}' has no {MANIFEST} beside it, so its model config is unknown; "
            f"export with `mini-engine export onnx --out DIR`, which writes one") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelNotFound(f"{directory / MANIFEST} is not a valid export manifest ({type(e).__name__}: {e}); "
                            f"re-export with `mini-engine export onnx --force`") from None
    return ModelSource(spec=spec, kind="onnx", config=config, path=directory, onnx_file=onnx_file,
                       origin_fingerprint=model.get("fingerprint"))


def _from_hf_cache(repo_id: str) -> Path:
    """Find a hub id in the local Hugging Face cache without touching the network."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise ModelNotFound(f"'{repo_id}' is not a local directory and huggingface_hub is not installed") from None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        raise ModelNotFound(
            f"model '{repo_id}' is not a local directory and not in the Hugging Face cache "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}); download it where "
            f"the hub is reachable (`hf download {repo_id}`) or pass a checkpoint directory, "
            f"or use random:gpt2 for a randomly initialised model"
        ) from None
    except Exception as e:  # invalid repo id and similar
        raise ModelNotFound(f"model '{repo_id}' is not a local directory or a valid hub id: {e}") from None
