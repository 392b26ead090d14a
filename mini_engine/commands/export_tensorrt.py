"""`mini-engine export tensorrt`: a TensorRT plan (+ metadata) from this project's ONNX export."""
from __future__ import annotations

import click

from .common import note_random


@click.command("tensorrt")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML config: model.source, model.dtype (float16 = --fp16) and [backend.options.tensorrt] "
                   "max_batch/max_seq/opt_batch/workspace_gb/timing_cache (or flat backend.options when "
                   "backend.name is tensorrt).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config key.")
@click.option("--onnx", "onnx_path", type=click.Path(), default=None,
              help="An ONNX export (directory with manifest.json, or its model.onnx) from `export onnx`.")
@click.option("--model", "-m", default=None, help="Export this model to ONNX first (instead of --onnx).")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="The .plan file to write.")
@click.option("--fp16", is_flag=True, default=None, help="float16 (LayerNorm, softmax, logits stay float32).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None, help="Largest batch (default 16).")
@click.option("--max-seq", type=click.IntRange(min=2), default=None,
              help="Longest past + new tokens (default: the model's context window).")
@click.option("--opt-batch", type=click.IntRange(min=1), default=None, help="Batch size TensorRT tunes for.")
@click.option("--workspace-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Builder workspace limit (default 4).")
@click.option("--timing-cache", type=click.Path(dir_okay=False), default=None,
              help="Reuse/update a timing cache file: faster rebuilds.")
@click.option("--device", default=None, help="cuda or cuda:N (default: backend.device if CUDA, else cuda).")
@click.option("--parity/--no-parity", default=True, show_default=True,
              help="Compare the plan with ONNX Runtime CPU on the same ONNX; exit non-zero when it differs.")
@click.option("--force", is_flag=True, help="Overwrite OUT.")
def tensorrt_cmd(config_path, overrides, onnx_path, model, out, fp16, max_batch, max_seq, opt_batch, workspace_gb,
                 timing_cache, device, parity, force):
    """Build a TensorRT engine (two optimization profiles: context and generation) into OUT."""
    from pathlib import Path

    from mini_engine.config import load_config
    from mini_engine.errors import BackendUnavailable, ConfigError, MiniEngineError
    from mini_engine.model.source import resolve_model
    from mini_engine_backends.tensorrt.runner import TensorRTRunner
    from mini_engine_export.tensorrt_build import BuildOptions, build_plan, model_meta
    from mini_engine_export.tensorrt_cache import cache_root, onnx_for
    from mini_engine_export.tensorrt_profiles import ProfileSettings

    if onnx_path and model:
        raise ConfigError("give --onnx (an existing export) or --model (export it first), not both")
    cfg = load_config(config_path, overrides, **{"model.source": model})
    opts = TensorRTRunner.parse_options(cfg.backend.options_for("tensorrt"))
    source = resolve_model(onnx_path or cfg.model.source)
    if onnx_path and source.kind != "onnx":
        raise ConfigError(f"--onnx '{onnx_path}' is not an ONNX export; make one with `mini-engine export onnx`")
    fp16 = fp16 if fp16 is not None else cfg.model.dtype == "float16"
    settings = ProfileSettings(max_batch=max_batch or opts.max_batch,
                               max_seq=max_seq or opts.max_seq or source.config.n_positions,
                               opt_batch=opt_batch or min(opts.opt_batch, max_batch or opts.max_batch))
    settings.validate(source.config)
    timing = timing_cache or opts.timing_cache
    build = BuildOptions(fp16=fp16, workspace_gb=workspace_gb or opts.workspace_gb,
                         timing_cache=Path(timing).expanduser() if timing else None)
    device = device or (cfg.backend.device if cfg.backend.device.startswith("cuda") else "cuda")
    if not device.startswith("cuda"):
        raise ConfigError(f"TensorRT builds for a CUDA device, not '{device}'")
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise ConfigError(f"{out} exists; pass --force to overwrite it")
    avail = TensorRTRunner.availability()
    if not avail.available:
        raise BackendUnavailable(f"cannot build a TensorRT engine here: {avail.reason}")

    log = lambda s: click.echo(s, err=True)  # noqa: E731
    if source.kind != "onnx":
        note_random(source.spec)
    onnx, precision, _ = onnx_for(source, "float16" if fp16 else "float32", cache_root(opts.cache_dir), log)
    index = int(device.partition(":")[2] or 0)
    build = BuildOptions(fp16=build.fp16, workspace_gb=build.workspace_gb, timing_cache=build.timing_cache,
                         device_index=index)
    build_plan(onnx, out, source.config, model_meta(source), settings, build, onnx_precision=precision, log=log)
    if parity:
        from mini_engine_export.tensorrt_parity import check_plan, format_table

        rows = check_plan(out, onnx, source, "float16" if fp16 or precision == "float16" else "float32", device)
        log(format_table(rows))
        if not all(r.passed for r in rows):
            raise MiniEngineError(f"TensorRT plan {out} differs from ONNX Runtime beyond tolerance (table above); "
                                  f"it is kept for inspection")
    click.echo(str(out))
