"""`mini-engine export`: one subcommand per target format (onnx here; tensorrt joins the group)."""
from __future__ import annotations

import click
from mini_engine_export.manifest import LOGITS_MODES

from .common import build_config, config_options, note_random


@click.group("export")
def command():
    """Export a model to a deployable format (with a manifest beside it)."""


@command.command("onnx")
@config_options
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Directory to write.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18).")
@click.option("--optimize/--no-optimize", default=False, show_default=True,
              help="Apply ONNX Runtime's transformer fusions for GPT-2 (LayerNorm/GELU; attention where matched).")
@click.option("--fp16", is_flag=True, help="float16 weights and KV for CUDA (LayerNorm, softmax, logits stay float32).")
@click.option("--validate/--no-validate", default=True, show_default=True,
              help="Compare the graph with the PyTorch forward; exit non-zero when it differs.")
@click.option("--force", is_flag=True, help="Re-export even when OUT holds an identical export.")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="torch.onnx exporter.")
@click.option("--logits", "logits", type=click.Choice(LOGITS_MODES), default="all", show_default=True,
              help="Logits output: every position [batch, seq, vocab], or the last one [batch, 1, vocab] "
                   "(less work at prefill; what generation reads; not for TensorRT).")
@click.option("--kv-cache", "kv_cache", type=click.Choice(["concat", "gqa"]), default="concat", show_default=True,
              help="KV-cache contract: concat (present = past ++ new; static batching, every backend) or gqa "
                   "(GroupQueryAttention over caches written in place; continuous batching on onnxruntime CPU; "
                   "float32, implies --logits last).")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None,
              help="Quantize the weights with ONNX Runtime's quantizers: int8 by default with quantize_dynamic "
                   "(W8A8, MatMulInteger, per-output-channel weight scales), int4 with MatMulNBits (weight-only, "
                   "block-wise scales, accuracy_level 4). --dtype int8/int4 means the same.")
@click.option("--block-size", type=int, default=None,
              help="matmulnbits: weights per scale block (power of two >= 16) [32].")
@click.option("--quant-method", type=click.Choice(["matmulnbits", "dynamic"]), default=None,
              help="dynamic (quantize_dynamic: MatMulInteger W8A8, int8 only) or matmulnbits (weight-only "
                   "MatMulNBits, int8 or int4) [int8: dynamic, int4: matmulnbits; measured in "
                   "result/cpu/quant/ort_int8_variants.md].")
@click.option("--quantize-lm-head/--no-quantize-lm-head", "lm_head", default=None,
              help="Quantize the tied lm_head (the vocab x n_embd embedding every step reads whole) [yes].")
def onnx(config_path, overrides, model, backend, device, dtype, out, opset, optimize, fp16, validate, force,
         exporter, logits, kv_cache, quantize, block_size, quant_method, lm_head):
    """Export the engine's GPT-2 forward with a KV cache to OUT/model.onnx."""
    from pathlib import Path

    from mini_engine.errors import ConfigError
    from mini_engine.model.source import resolve_model
    from mini_engine_export.onnx_export import DEFAULT_OPSET, export_onnx
    from mini_engine_export.onnx_quantize import QuantSpec

    cfg = build_config(config_path, overrides, model, backend, device, dtype)
    source = resolve_model(cfg.model.source)
    if dtype in ("int8", "int4"):
        if quantize not in (None, dtype):
            raise ConfigError(f"--dtype {dtype} and --quantize {quantize} disagree; give one of them")
        quantize = dtype
    if quantize is None and (block_size is not None or quant_method is not None or lm_head is not None):
        raise ConfigError("--block-size, --quant-method and --[no-]quantize-lm-head need --quantize int8|int4")
    spec = QuantSpec.make(quantize, quant_method, block_size, lm_head) if quantize else None
    note_random(cfg.model.source)
    if kv_cache == "gqa":
        if opset is not None or exporter != "dynamo":
            raise click.UsageError("--kv-cache gqa builds its own graph: --opset and --exporter do not apply")
        logits = "last"
    result = export_onnx(source, Path(out), opset=opset or DEFAULT_OPSET, optimize=optimize, fp16=fp16,
                         validate=validate, force=force, exporter=exporter, logits=logits,
                         log=lambda s: click.echo(s, err=True), kv_cache=kv_cache, quantize=spec)
    click.echo(str(result.model_file))


from .export_tensorrt import tensorrt_cmd  # noqa: E402  (its own module; heavy imports stay inside it)

command.add_command(tensorrt_cmd)
