"""The manifest written beside every ONNX export, and the I/O contract it records.

The contract (shared by the ONNX Runtime and TensorRT backends):

    inputs   input_ids                  int64  [batch, seq]
             position_ids               int64  [batch, seq]
             attention_mask             int64  [batch, total_seq]      total_seq = past + seq
             past_key_values.{i}.key    float  [batch, n_head, past, head_dim]   (also .value)
    outputs  logits                     float32 [batch, seq, vocab]   ([batch, 1, vocab] for --logits last)
             present.{i}.key            float  [batch, n_head, total_seq, head_dim]   (also .value)

The first step feeds zero-length past tensors. `float` is float32, or float16 for
`--fp16` exports; logits stay float32 either way.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from mini_engine.errors import ModelNotFound
from mini_engine.model.config import GPT2Config
from mini_engine.model.source import MANIFEST, ModelSource

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
# Files a checkpoint's tokenizer may consist of; copied into the export so the
# export directory alone is a complete --model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt")


def input_names(n_layer: int) -> list[str]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ["input_ids", "position_ids", "attention_mask"] + past


def output_names(n_layer: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


LOGITS_MODES = ("all", "last")
# The KV-cache contract an export implements. "concat" is the one above (present = past ++ new,
# static batching); "gqa" is onnx_gqa.py's (GroupQueryAttention over caller-owned buffers written
# in place: continuous batching). Absent from older manifests = concat.
KV_CACHE_CONTRACTS = {"concat": "concat-v1", "gqa": "gqa-v1"}


def io_contract(cfg: GPT2Config, precision: str, logits: str = "all") -> dict[str, list[dict[str, Any]]]:
    """Names, symbolic shapes and dtypes of every graph input and output."""
    kv = "float16" if precision == "float16" else "float32"
    heads = [cfg.n_head, None, cfg.head_dim]

    def spec(name, dims, dtype):
        return {"name": name, "shape": dims, "dtype": dtype}

    inputs = [spec("input_ids", ["batch", "seq"], "int64"), spec("position_ids", ["batch", "seq"], "int64"),
              spec("attention_mask", ["batch", "total_seq"], "int64")]
    inputs += [spec(n, ["batch", heads[0], "past", heads[2]], kv) for n in input_names(cfg.n_layer)[3:]]
    outputs = [spec("logits", ["batch", "seq" if logits == "all" else 1, cfg.vocab_size], "float32")]
    outputs += [spec(n, ["batch", heads[0], "total_seq", heads[2]], kv) for n in output_names(cfg.n_layer)[1:]]
    return {"inputs": inputs, "outputs": outputs}


def gqa_io_contract(cfg: GPT2Config) -> dict[str, list[dict[str, Any]]]:
    """The gqa-v1 graph's I/O (mini_engine_export.onnx_gqa's docstring says how to drive it)."""
    def spec(name, dims, dtype):
        return {"name": name, "shape": dims, "dtype": dtype}

    buf = ["batch", cfg.n_head, "capacity", cfg.head_dim]
    inputs = [spec("input_ids", ["batch", "seq"], "int64"), spec("position_ids", ["batch", "seq"], "int64"),
              spec("seqlens_k", ["batch"], "int32"), spec("total_sequence_length", [], "int32"),
              spec("query_lens", ["batch"], "int32")]
    inputs += [spec(f"past_{kv}.{i}", buf, "float32") for i in range(cfg.n_layer) for kv in ("key", "value")]
    outputs = [spec("logits", ["batch", cfg.vocab_size], "float32")]
    outputs += [spec(f"present_{kv}.{i}", buf, "float32") for i in range(cfg.n_layer) for kv in ("key", "value")]
    return {"inputs": inputs, "outputs": outputs}


def export_request(source: ModelSource, opset: int, precision: str, optimize: bool, exporter: str,
                   logits: str = "all", kv_cache: str = "concat", quantization: dict | None = None) -> dict:
    """What identifies an export: re-running with an equal request reuses the files.

    `quantization`: onnx_quantize.QuantSpec.request() (method, bits, block size, lm_head,
    symmetric) for an int8/int4 export; part of the request, so of the backend's cache key."""
    request = {"model_fingerprint": source.fingerprint(), "opset": opset, "precision": precision,
               "optimize": optimize, "exporter": exporter, "format": FORMAT_VERSION}
    if logits != "all":  # absent = all, so exports made before the option still match
        request["logits"] = logits
    if kv_cache != "concat":  # absent = concat, likewise
        request["kv_cache"] = kv_cache
    if quantization is not None:
        request["quantization"] = dict(quantization)
    return request


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "mini-engine"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def build_manifest(source: ModelSource, directory: Path, request: dict, optimization: dict,
                   validation: dict | None, quantization: dict | None = None) -> dict:
    """`quantization`: what onnx_quantize.quantize_model did (method, bits, block size, scales,
    which weights, lm_head), None for float exports."""
    from .onnx_quantize import weight_bytes_per_step

    files = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != MANIFEST)
    return {
        "format": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"spec": source.spec, "kind": source.kind, "fingerprint": source.fingerprint(),
                  "checkpoint": str(source.path) if source.path else None, "config": source.config.to_dict()},
        "request": request,
        "opset": request["opset"],
        "exporter": request["exporter"],
        "precision": request["precision"],
        "quantization": quantization,
        # Bytes of weights a decode step reads whole (embedding tables only gathered from excluded):
        # what the backend reports as weight_bytes, so bandwidth figures stay honest per precision.
        "weight_bytes_per_step": weight_bytes_per_step(directory / MODEL_FILE),
        "optimization": optimization,
        "kv_cache": KV_CACHE_CONTRACTS[request.get("kv_cache", "concat")],
        "io": io_contract(source.config, request["precision"], request.get("logits", "all"))
        if request.get("kv_cache", "concat") == "concat" else gqa_io_contract(source.config),
        "versions": versions(),
        "files": {"model": MODEL_FILE},
        "sha256": {name: sha256(directory / name) for name in files},
        "sizes": {name: (directory / name).stat().st_size for name in files},
        "validation": validation,
    }


@dataclass
class Manifest:
    """A manifest read back from disk."""

    directory: Path
    data: dict

    @classmethod
    def read(cls, directory: Path) -> "Manifest | None":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            return None
        try:
            return cls(Path(directory), json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise ModelNotFound(f"{path} is not valid JSON ({e}); re-export with --force") from None

    def write(self) -> None:
        (self.directory / MANIFEST).write_text(json.dumps(self.data, indent=2) + "\n")

    @property
    def model_file(self) -> Path:
        return self.directory / self.data.get("files", {}).get("model", MODEL_FILE)

    @property
    def precision(self) -> str:
        return self.data.get("precision", "float32")

    @property
    def quantization(self) -> dict | None:
        """onnx_quantize's record (method, bits, block_size, lm_head, ...) or None (float weights)."""
        return self.data.get("quantization")

    @property
    def weight_bytes_per_step(self) -> int | None:
        return self.data.get("weight_bytes_per_step")

    @property
    def kv_cache(self) -> str:
        """"concat" or "gqa": the KV-cache contract the graph implements."""
        return self.data.get("request", {}).get("kv_cache", "concat")

    @property
    def logits(self) -> str:
        """"all" ([batch, seq, vocab]) or "last" ([batch, 1, vocab])."""
        return self.data.get("request", {}).get("logits", "all")

    def problems(self, full_hash: bool = False) -> list[str]:
        """What is missing, truncated or changed since the export; empty when intact."""
        out = []
        for name, size in self.data.get("sizes", {}).items():
            f = self.directory / name
            if not f.is_file():
                out.append(f"{name} is missing")
            elif f.stat().st_size != size:
                out.append(f"{name} is {f.stat().st_size} bytes, the manifest says {size} (truncated or replaced?)")
            elif full_hash and sha256(f) != self.data["sha256"].get(name):
                out.append(f"{name} does not match its sha256 in the manifest")
        return out

    def matches(self, request: dict) -> bool:
        return self.data.get("request") == request and not self.problems()
