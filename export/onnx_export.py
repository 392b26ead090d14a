"""Export the engine's GPT-2 forward to one ONNX graph with a KV cache, plus a manifest.

The exported function is `mini_engine.model.gpt2.GPT2.forward` (inputs and outputs
in `manifest.io_contract`). Writing goes to a temporary sibling directory that is
renamed into place at the end, so an interrupted export never leaves a directory
that looks finished.

Exporter: torch.onnx's dynamo exporter (torch.export) by default. It is the
maintained path (the TorchScript exporter is deprecated since torch 2.9), its
symbolic shapes keep batch, seq, past and total_seq dynamic, and it keeps the tied
lm_head as one initializer. `exporter="torchscript"` remains for comparison: it
exports faster, but folds a transposed copy of the embedding into the graph (652 MB
instead of ~500 MB for gpt2), which `tie_lm_head` removes again.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mini_engine.errors import ConfigError, MiniEngineError
from mini_engine.model.source import ModelSource

from . import manifest as mf

DEFAULT_OPSET = 18
EXPORTERS = ("dynamo", "torchscript")
# Protobuf cannot hold more than 2 GB; stay clear of the limit with headroom for the graph.
EXTERNAL_DATA_BYTES = 1_800_000_000
DATA_FILE = mf.MODEL_FILE + ".data"


class ExportError(MiniEngineError):
    """The export could not be produced or does not validate."""


@dataclass
class ExportResult:
    directory: Path
    manifest: mf.Manifest
    reused: bool
    validation: object | None = None  # validate.Report when validation ran
    notes: list[str] = field(default_factory=list)

    @property
    def model_file(self) -> Path:
        return self.manifest.model_file


def in_cache(out: Path) -> bool:
    """Whether `out` is an export made on first use in a cache (<root>/onnx/<16 hex digits>, the
    onnxruntime backend's layout): the user never named that directory, so the messages must say
    where it is and how to get rid of it."""
    root = Path(os.environ.get("MINI_ENGINE_CACHE") or "~/.cache/mini-engine").expanduser()
    return (out.parent.resolve() == (root / "onnx").resolve()
            or out.parent.name == "onnx" and re.fullmatch(r"[0-9a-f]{16}", out.name) is not None)


def export_onnx(source: ModelSource, out: Path, opset: int = DEFAULT_OPSET, optimize: bool = False,
                fp16: bool = False, validate: bool = True, force: bool = False, exporter: str = "dynamo",
                logits: str = "all", log: Callable[[str], None] = lambda s: None,
                cache: bool | None = None, kv_cache: str = "concat", quantize=None) -> ExportResult:
    """Export `source` into directory `out` (reusing an identical earlier export unless `force`).

    `kv_cache`: "concat" (the torch.onnx export of GPT2.forward: present = past ++ new) or "gqa"
    (onnx_gqa.py's graph for continuous batching: float32, last-token logits, written from the
    weights, validated over ragged prefill/decode/chunked steps).

    `cache`: `out` is a cache entry made on first use rather than a directory the user chose
    (None: when it lies in the default cache), which changes what the messages tell the user.

    `quantize`: an onnx_quantize.QuantSpec (int8 / int4 weights with ONNX Runtime's quantizers,
    applied to either contract's float32 graph, validated against the float32 PyTorch forward
    within quantization error), or None for float weights.
    """
    if source.kind == "onnx":
        raise ConfigError(f"'{source.spec}' is already an ONNX export; pass the checkpoint or random:<preset>")
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter must be one of {', '.join(EXPORTERS)}, got '{exporter}'")
    if not 14 <= opset <= 23:
        raise ConfigError(f"--opset must be in 14..23 (LayerNormalization needs 17+ to stay one op), got {opset}")
    if logits not in mf.LOGITS_MODES:
        raise ConfigError(f"logits must be one of {', '.join(mf.LOGITS_MODES)}, got '{logits}'")
    if kv_cache not in mf.KV_CACHE_CONTRACTS:
        raise ConfigError(f"kv_cache must be one of {', '.join(mf.KV_CACHE_CONTRACTS)}, got '{kv_cache}'")
    if quantize is not None and fp16:
        raise ConfigError("--quantize and --fp16 exclude each other: quantized exports keep float32 activations "
                          "and KV")
    if kv_cache == "gqa":
        if fp16 or optimize or logits != "last":
            raise ConfigError("--kv-cache gqa exports float32 with last-token logits and its own fused graph; "
                              "drop --fp16 / --optimize and use --logits last")
        from .onnx_gqa import DEFAULT_OPSET as GQA_OPSET, runtime_problem

        problem = runtime_problem()
        if problem:
            raise ExportError(f"cannot export --kv-cache gqa: {problem}")
        opset, exporter = GQA_OPSET, "gqa-builder"
    out = Path(out).expanduser()
    cache = in_cache(out) if cache is None else cache
    precision = quantize.precision if quantize is not None else "float16" if fp16 else "float32"
    request = mf.export_request(source, opset, precision, optimize, exporter, logits, kv_cache,
                                quantize.request() if quantize is not None else None)
    existing = mf.Manifest.read(out) if out.is_dir() else None
    if existing is not None and not force:
        if existing.matches(request) and (existing.data.get("validation") or {}).get("passed", True):
            how = "delete that directory to re-export" if cache else "`mini-engine export onnx --force` re-exports"
            log(f"reusing the export in {out} (same model and settings; {how})")
            return ExportResult(out, existing, reused=True)
        if existing.data.get("request") != request:
            raise ExportError(f"{out} holds an export with different settings "
                              f"({existing.data.get('model', {}).get('spec')}, {existing.data.get('request')}); "
                              f"pass --force to replace it or choose another --out")
        log(f"the export in {out} is damaged ({'; '.join(existing.problems()) or 'failed validation'}); re-exporting")
    elif out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an export directory; choose another --out or pass --force")

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        result = _export_into(source, tmp, request, optimize, validate, exporter, log)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result.directory = out
    result.manifest.directory = out
    if result.validation is not None and not result.validation.passed:
        raise ExportError(f"validation failed: {result.validation.failure()} (the export stays in {out} "
                          f"for inspection and will not be reused)")
    size = f"{sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.0f} MB"
    if cache:
        log(f"cached the export ({size}) in {out}: reused while the model and settings stay the same; "
            f"`rm -rf {out.parent}` clears the export cache (MINI_ENGINE_CACHE moves it)")
    else:
        log(f"wrote {out} ({size})")
    return result


def _export_into(source: ModelSource, tmp: Path, request: dict, optimize: bool, validate: bool,
                 exporter: str, log) -> ExportResult:
    import onnx

    from mini_engine.model.gpt2 import LastPositionLogits
    from mini_engine.model.weights import build_model

    cfg = source.config
    external = cfg.weight_bytes("float32") > EXTERNAL_DATA_BYTES
    model = build_model(source, "float32", "cpu")
    if request.get("kv_cache") == "gqa":
        return _export_gqa_into(source, model, tmp, request, validate, external, log)
    t0 = time.perf_counter()
    log(f"exporting {source.spec} with the {exporter} exporter (opset {request['opset']})...")
    last = request.get("logits") == "last"
    exported = LastPositionLogits(model) if last else model
    proto = _torch_export(exported, cfg, request["opset"], exporter, tmp, last)
    tie_lm_head(proto, cfg)
    _name_total_seq(proto, cfg)
    path = tmp / mf.MODEL_FILE
    _save(proto, path, external)
    del proto
    onnx.checker.check_model(str(path))
    log(f"exported in {time.perf_counter() - t0:.1f} s: {path.stat().st_size / 1e6:.0f} MB"
        + (" + external data" if external else ""))

    optimization = {"requested": optimize, "applied": False}
    if optimize:
        from .optimize import optimize_gpt2

        optimization = optimize_gpt2(path, cfg, external, log)
    quantization = None
    if "quantization" in request:
        # After fusion, like float16: the optimizer's patterns are written for float32 graphs.
        quantization = _quantize_file(path, request, cfg, log)
    if request["precision"] == "float16":
        # After fusion: the optimizer's patterns are written for float32 graphs.
        _save(to_float16(onnx.load(str(path))), path, external)
        onnx.checker.check_model(str(path))
    _copy_tokenizer(source, tmp)

    report = None
    if validate:
        from .validate import validate_export

        report = validate_export(path, model, cfg, request["precision"])
        for line in report.table().splitlines():
            log(line)
    manifest = mf.Manifest(tmp, mf.build_manifest(source, tmp, request, optimization,
                                                  report.summary() if report else None, quantization))
    manifest.write()
    return ExportResult(tmp, manifest, reused=False, validation=report)


def _quantize_file(path: Path, request: dict, cfg, log) -> dict:
    """Quantize the float32 graph at `path` in place (onnx_quantize); returns the manifest record."""
    import onnx

    from .onnx_quantize import QuantizeError, QuantSpec, quantize_model

    spec = QuantSpec.from_request(request["precision"], request["quantization"])
    t0 = time.perf_counter()
    try:
        proto, record = quantize_model(onnx.load(str(path)), spec, cfg, log, tmp_dir=path.parent)
    except QuantizeError as e:
        raise ExportError(f"quantization failed: {e}") from None
    for f in path.parent.glob(path.name + "*"):
        f.unlink()
    _save(proto, path, proto.ByteSize() > EXTERNAL_DATA_BYTES)
    del proto
    log(f"quantized in {time.perf_counter() - t0:.1f} s: {path.stat().st_size / 1e6:.0f} MB")
    return record


def _export_gqa_into(source, model, tmp: Path, request: dict, validate: bool, external: bool, log) -> ExportResult:
    from .onnx_gqa import GqaValidation, build_gqa_graph, validate_gqa_graph

    t0 = time.perf_counter()
    log(f"building the GroupQueryAttention graph of {source.spec} (kv cache contract gqa-v1)...")
    path = build_gqa_graph(model, tmp / mf.MODEL_FILE, external_data=external)
    log(f"built in {time.perf_counter() - t0:.1f} s: {path.stat().st_size / 1e6:.0f} MB"
        + (" + external data" if external else ""))
    quantization = _quantize_file(path, request, source.config, log) if "quantization" in request else None
    _copy_tokenizer(source, tmp)
    precision = request["precision"]
    report = None
    if validate:
        from .onnx_gqa import cpu_session
        from .validate import decode_check

        session = cpu_session(path)
        report = GqaValidation(validate_gqa_graph(path, model, session=session, precision=precision), precision,
                               decode_check(session, model, source.config, precision, "gqa")
                               if quantization is not None else None)
        del session
    if report is not None:
        for line in report.table().splitlines():
            log(line)
    manifest = mf.Manifest(tmp, mf.build_manifest(source, tmp, request, {"requested": False, "applied": False},
                                                  report.summary() if report else None, quantization))
    manifest.write()
    return ExportResult(tmp, manifest, reused=False, validation=report)


def _copy_tokenizer(source, tmp: Path) -> None:
    if source.kind == "local" and source.path is not None:
        for name in mf.TOKENIZER_FILES:
            if (source.path / name).is_file():
                shutil.copy2(source.path / name, tmp / name)


def _sample_inputs(cfg):
    """Batch 2, seq 3, past 4: distinct sizes above 1 so the exporter specialises on none."""
    import torch

    b, t, p = 2, 3, 4
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    pos = torch.arange(p, p + t).expand(b, t).contiguous()
    mask = torch.ones(b, p + t, dtype=torch.int64)
    past = [(torch.zeros(b, cfg.n_head, p, cfg.head_dim), torch.zeros(b, cfg.n_head, p, cfg.head_dim))
            for _ in range(cfg.n_layer)]
    return ids, pos, mask, past


def _torch_export(model, cfg, opset: int, exporter: str, tmp: Path, last_logits: bool = False):
    import logging
    import warnings

    import onnx
    import torch

    # "torchvision is not installed. Skipping torchvision::nms" x4: noise for a GPT-2 export.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    args = _sample_inputs(cfg)
    names_in, names_out = mf.input_names(cfg.n_layer), mf.output_names(cfg.n_layer)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                from torch.export import Dim

                limit = cfg.n_positions
                batch, seq = Dim("batch", max=4096), Dim("seq", max=limit)
                past, total = Dim("past", max=limit), Dim("total_seq", max=limit)
                shapes = {"input_ids": {0: batch, 1: seq}, "position_ids": {0: batch, 1: seq},
                          "attention_mask": {0: batch, 1: total},
                          "past_key_values": [({0: batch, 2: past}, {0: batch, 2: past})] * cfg.n_layer}
                program = torch.onnx.export(model, args, dynamo=True, opset_version=opset, input_names=names_in,
                                            output_names=names_out, dynamic_shapes=shapes, verbose=False)
                return program.model_proto
            axes = {"input_ids": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
                    "attention_mask": {0: "batch", 1: "total_seq"},
                    "logits": {0: "batch"} if last_logits else {0: "batch", 1: "seq"}}
            axes.update({n: {0: "batch", 2: "past"} for n in names_in[3:]})
            axes.update({n: {0: "batch", 2: "total_seq"} for n in names_out[1:]})
            raw = tmp / "torchscript.onnx"
            torch.onnx.export(model, args, str(raw), dynamo=False, opset_version=opset, input_names=names_in,
                              output_names=names_out, dynamic_axes=axes)
            proto = onnx.load(str(raw))
            for f in tmp.iterdir():
                f.unlink()
            return proto
    except MiniEngineError:
        raise
    except Exception as e:
        raise ExportError(f"torch.onnx.export ({exporter}) failed: {type(e).__name__}: {str(e).splitlines()[0]}"
                          + (" (try --exporter torchscript)" if exporter == "dynamo" else "")) from None


def tie_lm_head(proto, cfg) -> bool:
    """Make the logits MatMul read the embedding itself (Gemm transB=1), not a transposed copy.

    Exporters turn F.linear(x, wte) into MatMul(x, wte^T): the TorchScript exporter folds
    wte^T into a second 154 MB initializer, the dynamo exporter leaves a Transpose that ONNX
    Runtime folds into a second copy in memory. Returns whether the graph changed.
    """
    import numpy as np
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    wte_name = next((n for n in inits if n.endswith("wte.weight")), None)
    if wte_name is None:
        return False
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    wte = None
    for idx, node in enumerate(g.node):
        if node.op_type != "MatMul":
            continue
        b = node.input[1]
        dead: list = []
        if b in producer and producer[b].op_type == "Transpose" and producer[b].input[0] == wte_name:
            dead = [producer[b]] if consumers.get(b) == 1 else []
        elif b in inits and tuple(inits[b].dims) == (cfg.n_embd, cfg.vocab_size):
            wte = numpy_helper.to_array(inits[wte_name]) if wte is None else wte
            if not np.array_equal(numpy_helper.to_array(inits[b]), wte.T):
                continue
            if consumers.get(b) == 1:
                g.initializer.remove(inits[b])
        else:
            continue
        x, y, p = node.input[0], node.output[0], "lm_head_tied"
        consts = [numpy_helper.from_array(np.array(v, dtype=np.int64), f"{p}_{k}")
                  for k, v in (("flat", [-1, cfg.n_embd]), ("start", [0]), ("end", [-1]), ("vocab", [cfg.vocab_size]))]
        g.initializer.extend(consts)
        new = [helper.make_node("Reshape", [x, f"{p}_flat"], [f"{p}_x2d"]),
               helper.make_node("Gemm", [f"{p}_x2d", wte_name], [f"{p}_y2d"], transB=1),
               helper.make_node("Shape", [x], [f"{p}_xshape"]),
               helper.make_node("Slice", [f"{p}_xshape", f"{p}_start", f"{p}_end"], [f"{p}_lead"]),
               helper.make_node("Concat", [f"{p}_lead", f"{p}_vocab"], [f"{p}_yshape"], axis=0),
               helper.make_node("Reshape", [f"{p}_y2d", f"{p}_yshape"], [y])]
        g.node.remove(node)
        for d in dead:
            g.node.remove(d)
        for k, n in enumerate(new):
            g.node.insert(idx - len(dead) + k, n)
        return True
    return False


def _name_total_seq(proto, cfg) -> None:
    """Name the present length `total_seq` (the dynamo exporter writes `past + seq`)."""
    for out in proto.graph.output:
        if out.name.startswith("present."):
            out.type.tensor_type.shape.dim[2].dim_param = "total_seq"


def to_float16(proto):
    """float16 weights and KV; LayerNorm, Softmax and the float32 logits stay in float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = convert_float_to_float16(proto, keep_io_types=["logits"], disable_shape_infer=True,
                                     op_block_list=["LayerNormalization", "Softmax", "SkipLayerNormalization"])
    # The converter appends the Casts it adds around blocked ops; ONNX wants topological order.
    model = OnnxModel(proto)
    model.topological_sort()
    return model.model


def _save(proto, path: Path, external: bool) -> None:
    import onnx

    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
