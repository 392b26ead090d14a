"""ONNX Runtime runner: the exported GPT-2 graph, KV cache kept as OrtValues between steps.

Two exports, two step contracts:
- continuous batching (`execute_paged`) runs the GroupQueryAttention export (kv cache contract
  gqa-v1, export/onnx_gqa.py): one cache row per sequence, written in place (paged_slots.py);
- static batching (`execute`: scoring, the static and naive baselines) runs the concat export
  (present = past ++ new), loaded on first use when the gqa export serves generation.

For the concat export, each step binds the previous step's `present.*` outputs as this step's `past_key_values.*`
through IO binding, so the cache never passes through numpy; on CUDA it stays on the
device, and only the logits are copied to the host. When the engine drops finished rows,
a tiny Gather graph (same providers) selects the remaining rows, again without leaving
the device.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mini_engine.devices import cuda_unavailable_reason, module_installed, package_version
from mini_engine.errors import BackendUnavailable, ConfigError, MiniEngineError, ModelNotFound
from mini_engine.runner import Availability, Runner, StepInput

from .paged_slots import PagedSlots

QUANTIZED = ("int8", "int4")


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or " avx_vnni" in flags


@dataclass
class OrtOptions:
    # Execution providers in priority order; [] = CPUExecutionProvider on cpu, CUDA (+CPU) on cuda.
    providers: list[str] = field(default_factory=list)
    intra_op_threads: int = 0  # 0 = one per physical core
    inter_op_threads: int = 0
    graph_optimization_level: str = "all"  # disable | basic | extended | all
    # Busy-wait of ORT's worker threads between ops: on = lowest latency; auto = on unless
    # PyTorch is loaded in the same process (its threads would fight ORT's for the cores).
    allow_spinning: str = "auto"  # auto | on | off
    onnx_path: str = ""  # an export directory or .onnx file; "" = model.source (exported on first use)
    optimize: bool = False  # apply ORT's transformer fusions when exporting on first use
    # Logits output of the graph exported on first use: "last" skips the lm_head on every
    # position but the final one (what generation and scoring read); "all" for every position.
    logits: str = "last"
    cache_dir: str = ""  # "" = $MINI_ENGINE_CACHE or ~/.cache/mini-engine
    trt_engine_cache: str = ""  # TensorrtExecutionProvider engine cache; "" = <cache_dir>/tensorrt
    trt_fp16: bool = False
    trt_max_batch_size: int = 16  # the TensorRT optimisation profile's largest shapes
    trt_max_seq_len: int = 0  # 0 = the model's context window
    # KV-cache contract of the export that serves generation: "gqa" (continuous batching over
    # GroupQueryAttention with caches written in place), "concat" (static batching only), or
    # "auto" (gqa on CPU in float32, int8 or int4 where this onnxruntime's GroupQueryAttention can run it).
    kv_cache: str = "auto"
    # model.dtype int8 / int4: how the export made on first use is quantized (onnx_quantize.py;
    # part of the cache key). "" / 0 = the measured defaults: int8 dynamic (quantize_dynamic, W8A8
    # MatMulInteger), int4 matmulnbits (weight-only MatMulNBits, accuracy_level 4) with block size
    # 32; lm_head quantized.
    quant_method: str = ""  # "" | dynamic (int8 only) | matmulnbits
    quant_block_size: int = 0
    quantize_lm_head: bool = True

    def __post_init__(self):
        from .session import LEVELS

        if self.intra_op_threads < 0 or self.inter_op_threads < 0:
            raise ConfigError("backend.options.intra_op_threads/inter_op_threads must be >= 0")
        if self.graph_optimization_level not in LEVELS:
            raise ConfigError(f"backend.options.graph_optimization_level must be one of {', '.join(LEVELS)}, "
                              f"got '{self.graph_optimization_level}'")
        if self.allow_spinning not in ("auto", "on", "off"):
            raise ConfigError(f"backend.options.allow_spinning must be auto, on or off, got '{self.allow_spinning}'")
        from mini_engine_export.manifest import LOGITS_MODES

        if self.logits not in LOGITS_MODES:
            raise ConfigError(f"backend.options.logits must be one of {', '.join(LOGITS_MODES)}, got '{self.logits}'")
        if self.kv_cache not in ("auto", "gqa", "concat"):
            raise ConfigError(f"backend.options.kv_cache must be auto, gqa or concat, got '{self.kv_cache}'")
        if self.trt_max_batch_size < 1 or self.trt_max_seq_len < 0:
            raise ConfigError("backend.options.trt_max_batch_size must be >= 1 and trt_max_seq_len >= 0")
        from mini_engine_export.onnx_quantize import METHODS

        if self.quant_method not in ("",) + METHODS:
            raise ConfigError(f"backend.options.quant_method must be one of {', '.join(METHODS)}, "
                              f"got '{self.quant_method}'")
        if self.quant_block_size < 0:
            raise ConfigError("backend.options.quant_block_size must be >= 0 (0 = the default, 32)")


class OrtRunner(PagedSlots, Runner):
    name = "onnxruntime"
    supported_devices = ("cpu", "cuda")
    Options = OrtOptions
    supports_paged = True
    kv_layout = "slots"

    @classmethod
    def availability(cls) -> Availability:
        if not module_installed("onnxruntime"):
            return Availability(False, "onnxruntime is not installed (pip install mini-engine[onnx], "
                                       "or mini-engine[gpu] for CUDA)", (), None)
        version = package_version("onnxruntime-gpu", "onnxruntime")
        gpu = package_version("onnxruntime-gpu") is not None and cuda_unavailable_reason() is None
        return Availability(True, None, ("cpu", "cuda") if gpu else ("cpu",), version)

    # ----- lifecycle -------------------------------------------------------
    def _load_impl(self) -> None:
        from . import session as s

        if self.config.dtype == "bfloat16":
            raise ConfigError("the onnxruntime backend runs float32, float16 (CUDA), int8 or int4 (CPU) exports, "
                              "not bfloat16")
        self.device_kind, self.device_id = s.device_type(self.config.device)
        if self.config.dtype == "float16" and self.device_kind != "cuda":
            raise ConfigError("float16 ONNX graphs need --device cuda; on CPU use float32")
        if self.config.dtype in QUANTIZED and self.device_kind != "cpu":
            raise ConfigError(f"--dtype {self.config.dtype} on onnxruntime runs on CPU only (MatMulNBits int8/int4 "
                              f"exports, MLAS kernels); use --device cpu, or float16 on {self.config.device}")
        if self.config.dtype in QUANTIZED and self.options.providers not in ([], ["CPUExecutionProvider"]):
            raise ConfigError(f"--dtype {self.config.dtype} on onnxruntime runs on CPUExecutionProvider only, "
                              f"not {self.options.providers[0]}")
        self.cache_root = s.cache_root(self.options.cache_dir)
        self.providers = s.choose_providers(self.options.providers, self.config.device)
        self.spinning = s.resolve_spinning(self.options.allow_spinning)
        self.session_opts = s.session_options(self.options, self.spinning)
        self.session = self.gather = self.export = self.gqa_session = None
        self.past: list | None = None
        self.layout: list[int] = []
        self.cached_len = 0
        self.given_export = given = self._given_export()
        if given is not None:
            self._check_precision(given)
        self.gqa_export, self.paged_reason = None, None
        if given is not None and given.kv_cache == "gqa":
            if self.options.kv_cache == "concat":
                raise ModelNotFound(f"the export in '{given.directory}' implements the gqa-v1 kv cache contract but "
                                    f"backend.options.kv_cache is 'concat'; give a concat export or use 'auto'")
            self.gqa_export = given
        elif given is not None:
            if self.options.kv_cache == "gqa":
                raise ModelNotFound(f"the export in '{given.directory}' implements the concat kv cache contract "
                                    f"(static batching); for continuous batching export with "
                                    f"`mini-engine export onnx --kv-cache gqa` or use backend.options.kv_cache = auto")
            self.paged_reason = (f"the export in '{given.directory}' implements the concat kv cache contract; "
                                 f"`mini-engine export onnx --kv-cache gqa` makes one for continuous batching")
            self._load_static(given)
        else:
            self.paged_reason = self._gqa_problem()
            if self.paged_reason is None:
                self.gqa_export = self._export_to_cache(self.config.model, "gqa")
            elif self.options.kv_cache == "gqa":
                raise BackendUnavailable(f"backend.options.kv_cache = 'gqa' cannot run here: {self.paged_reason}")
            else:
                self._load_static(self._export_to_cache(self.config.model, "concat"))
        if self.gqa_export is not None:
            self._load_gqa(self.gqa_export)
        serving = self.gqa_export or self.export
        self.precision = serving.precision
        self.quantization = serving.quantization
        self.onnx_file = serving.model_file

    def _check_precision(self, manifest) -> None:
        """An export named explicitly runs at its manifest's precision. model.dtype float32 (the
        default) accepts any; another dtype must be the manifest's, and a quantized manifest must
        describe the graph it sits beside."""
        want, got = self.config.dtype, manifest.precision
        if want != "float32" and want != got:
            how = (f"`mini-engine export onnx --quantize {want}` makes one, or give the checkpoint and "
                   f"--dtype {want} exports on first use" if want in QUANTIZED else "re-export or drop --dtype")
            raise ModelNotFound(f"the export in '{manifest.directory}' is {got} but model.dtype is {want}; {how}")
        if got in QUANTIZED:
            self._check_quantized_graph(manifest)
            self.config.dtype = got  # describe(), bench metadata and KV sizing read the precision run
        elif got == "float16" and self.device_kind != "cuda":
            raise ConfigError(f"the export in '{manifest.directory}' is float16, which needs --device cuda")

    @staticmethod
    def _check_quantized_graph(manifest) -> None:
        """The quantized nodes the manifest records must be in the graph (one line if not)."""
        import onnx

        record = manifest.quantization or {}
        ops = set(record.get("quantized_ops") or ())
        try:
            proto = onnx.load(str(manifest.model_file), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - any parse failure is a damaged export
            raise ModelNotFound(f"cannot load '{manifest.model_file}': not a valid ONNX model "
                                f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); re-export with "
                                f"`mini-engine export onnx --quantize {manifest.precision} --force`") from None
        found = sum(n.op_type in ops for n in proto.graph.node)
        if not record or not ops or found != record.get("quantized_nodes"):
            raise ModelNotFound(f"the export in '{manifest.directory}' does not match its manifest: it says "
                                f"{manifest.precision} with {record.get('quantized_nodes', '?')} quantized matmuls "
                                f"({', '.join(sorted(ops)) or 'none recorded'}), the graph has {found}; re-export "
                                f"with `mini-engine export onnx --quantize {manifest.precision} --force`")

    def _quant_spec(self):
        from mini_engine_export.onnx_quantize import QuantSpec

        if self.config.dtype not in QUANTIZED:
            return None
        o = self.options
        return QuantSpec.make(self.config.dtype, o.quant_method or None, o.quant_block_size or None,
                              o.quantize_lm_head)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads. int8/int4: from the export being run (its
        manifest: the quantized weights with their scales, biases and LayerNorms; the float32
        embedding tables only gathered from are not read whole), so bandwidth figures stay honest.
        float: the parameter count times the element size, as every backend counts it."""
        if self.config.dtype not in QUANTIZED:
            return super().weight_bytes
        export = (self.gqa_export or self.export) if self.is_loaded else None
        if export is not None and export.weight_bytes_per_step:
            return export.weight_bytes_per_step
        # Not loaded yet: the same accounting from the shapes.
        from mini_engine_export.onnx_quantize import estimate_weight_bytes

        return estimate_weight_bytes(self.config.model.config, self._quant_spec())

    def _gqa_problem(self) -> str | None:
        """Why the gqa export cannot serve this configuration, or None."""
        if self.options.kv_cache == "concat":
            return "backend.options.kv_cache = 'concat' (static batching)"
        if self.device_kind != "cpu" or self.config.dtype not in ("float32",) + QUANTIZED:
            return ("the gqa export runs on CPU in float32, int8 or int4 (CUDA's GroupQueryAttention takes float16 "
                    "only; untested here)")
        from mini_engine_export.onnx_gqa import runtime_problem

        return runtime_problem()

    def _load_static(self, export=None) -> None:
        """The concat export's session (static steps); on first use when the gqa export serves generation."""
        from . import session as s

        if self.session is not None:
            return
        if export is None:
            if self.given_export is not None:
                raise MiniEngineError(f"the export in '{self.gqa_export.directory}' implements only the gqa-v1 "
                                      f"contract (continuous batching); static steps (scoring, static batching) "
                                      f"need a concat export (`mini-engine export onnx`)")
            export = self._export_to_cache(self.config.model, "concat")
        self.export = export
        cfg = self.config.model.config
        popts = s.provider_options(self.providers, self.config.device, self.options, cfg, self.cache_root,
                                   export.precision)
        self.session = s.create_session(export.model_file, self.session_opts, self.providers, popts)
        self._check_contract()
        # Row selection runs on CUDA (or CPU), never TensorRT: it is one Gather per tensor.
        gather_providers = [p for p in self.providers if p != "TensorrtExecutionProvider"] or ["CPUExecutionProvider"]
        self.gather = s.create_session(self._gather_graph(), self.session_opts, gather_providers,
                                       [{} if p == "CPUExecutionProvider" else {"device_id": self.device_id}
                                        for p in gather_providers])
        self.kv_dtype = np.float16 if export.precision == "float16" else np.float32
        self.past_names = [i.name for i in self.session.get_inputs()][3:]
        self.present_names = [o.name for o in self.session.get_outputs()][1:]

    def _close_impl(self) -> None:
        self.session = self.gather = self.gqa_session = None
        self.past = None

    def paged_unsupported_reason(self) -> str | None:
        return self.paged_reason

    def _given_export(self):
        """The export named by options.onnx_path or model.source, or None when there is none to run."""
        from mini_engine.model.source import resolve_model
        from mini_engine_export.manifest import Manifest

        source = self.config.model
        if self.options.onnx_path:
            given = resolve_model(self.options.onnx_path)
            if given.kind != "onnx":
                raise ConfigError(f"backend.options.onnx_path '{self.options.onnx_path}' is not an ONNX export "
                                  f"(a directory with manifest.json, or its .onnx file)")
            if source.kind != "onnx" and given.fingerprint() != source.fingerprint():
                raise ModelNotFound(f"the export in '{given.path}' was made from a different model than "
                                    f"model.source '{source.spec}' (manifest fingerprint {given.fingerprint()}, "
                                    f"model {source.fingerprint()}); re-export or fix backend.options.onnx_path")
            source = given
        if source.kind == "onnx":
            manifest = Manifest.read(source.path)
            if manifest is None:
                raise ModelNotFound(f"'{source.spec}' has no manifest.json")
            problems = manifest.problems()
            if problems:
                raise ModelNotFound(f"the export in '{source.path}' is damaged: {problems[0]}; "
                                    f"re-export with `mini-engine export onnx --force`")
            if source.onnx_file is not None and source.onnx_file.resolve() != manifest.model_file.resolve():
                manifest.data.setdefault("files", {})["model"] = source.onnx_file.name
            return manifest
        return None

    def _export_to_cache(self, source, kv_cache: str):
        from mini_engine_export.manifest import export_request
        from mini_engine_export.onnx_export import DEFAULT_OPSET, export_onnx
        from mini_engine_export.onnx_gqa import DEFAULT_OPSET as GQA_OPSET

        spec = self._quant_spec()
        precision = spec.precision if spec else "float16" if self.config.dtype == "float16" else "float32"
        gqa = kv_cache == "gqa"
        opset, optimize, logits = (GQA_OPSET, False, "last") if gqa else (DEFAULT_OPSET, self.options.optimize,
                                                                          self.options.logits)
        # The request holds the quantization (method, bits, block size, lm_head): so does the cache key.
        request = export_request(source, opset, precision, optimize, "gqa-builder" if gqa else "dynamo", logits,
                                 kv_cache, spec.request() if spec else None)
        keyed = dict(request)
        if spec is not None and spec.method == "dynamic":
            # MLAS's u8 x s8 kernels differ with VNNI (exact) and without (VPMADDUBSW, int16 pair sums
            # that can saturate): a machine of the other kind exports and validates its own copy.
            keyed["cpu_int8_dot"] = "vnni" if _has_vnni() else "no-vnni"
        key = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
        out = self.cache_root / "onnx" / key
        import click

        result = export_onnx(source, out, opset=opset, optimize=optimize, fp16=precision == "float16",
                             validate=True, logits=logits, kv_cache=kv_cache, quantize=spec,
                             log=lambda line: click.echo(f"[onnx export] {line}", err=True))
        return result.manifest

    def _check_contract(self) -> None:
        """The graph's I/O must be the manifest's (and the model config's) contract."""
        io = self.export.data.get("io", {})
        want_in = [x["name"] for x in io.get("inputs", [])]
        want_out = [x["name"] for x in io.get("outputs", [])]
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        n_layer = self.config.model.config.n_layer
        if got_in != want_in or got_out != want_out or len(got_in) != 3 + 2 * n_layer:
            diff = next((f"{a} != {b}" for a, b in zip(got_in + got_out, want_in + want_out) if a != b),
                        f"{len(got_in)} inputs, {len(want_in)} in the manifest, {3 + 2 * n_layer} for {n_layer} layers")
            raise ModelNotFound(f"the manifest in '{self.export.directory}' does not match {self.export.model_file.name} "
                                f"({diff}); re-export with `mini-engine export onnx --force`")

    def _gather_graph(self) -> bytes:
        from onnx import TensorProto, helper

        n = 2 * self.config.model.config.n_layer
        elem = TensorProto.FLOAT16 if self.export.precision == "float16" else TensorProto.FLOAT
        inputs = [helper.make_tensor_value_info("rows", TensorProto.INT64, ["n"])]
        inputs += [helper.make_tensor_value_info(f"in{i}", elem, ["b", "h", "p", "d"]) for i in range(n)]
        outputs = [helper.make_tensor_value_info(f"out{i}", elem, ["n", "h", "p", "d"]) for i in range(n)]
        nodes = [helper.make_node("Gather", [f"in{i}", "rows"], [f"out{i}"], axis=0) for i in range(n)]
        graph = helper.make_graph(nodes, "select_rows", inputs, outputs)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        return model.SerializeToString()

    # ----- KV cache ----------------------------------------------------------
    def _allocate_kv_impl(self, num_slots: int, max_seq_len: int) -> None:
        # The cache grows inside the graph (present = past ++ new): nothing to reserve up front.
        self._load_static()
        self.past, self.layout, self.cached_len = None, [], 0

    def _free_kv_impl(self) -> None:
        self.past, self.layout, self.cached_len = None, [], 0

    # ----- execution -----------------------------------------------------------
    def _execute_impl(self, step: StepInput) -> np.ndarray:
        from onnxruntime import OrtValue

        b = step.batch_size
        if step.logits == "all" and step.seq_len > 1 and self.export.logits == "last":
            raise MiniEngineError(f"the export in '{self.export.directory}' returns last-position logits only; "
                                  f"for every position use an export made with --logits all "
                                  f"(backend.options.logits = \"all\")")
        if step.past_len == 0:
            cfg = self.config.model.config
            empty = OrtValue.ortvalue_from_shape_and_type([b, cfg.n_head, 0, cfg.head_dim], self.kv_dtype,
                                                          self.device_kind, self.device_id)
            past = [empty] * len(self.past_names)
        else:
            past = self._select_rows(step)
        io = self.session.io_binding()
        feeds = [np.ascontiguousarray(a, dtype=np.int64) for a in (step.input_ids, step.position_ids,
                                                                   step.attention_mask)]
        for name, array in zip(("input_ids", "position_ids", "attention_mask"), feeds):
            io.bind_cpu_input(name, array)
        for name, value in zip(self.past_names, past):
            io.bind_ortvalue_input(name, value)
        io.bind_output("logits", "cpu")
        for name in self.present_names:
            io.bind_output(name, self.device_kind, self.device_id)
        self.session.run_with_iobinding(io)
        outputs = io.get_outputs()
        self.past, self.layout = outputs[1:], list(step.slot_ids)
        self.cached_len = step.past_len + step.seq_len
        logits = outputs[0].numpy()
        return logits[:, -1, :] if step.logits == "last" else logits

    def _select_rows(self, step: StepInput) -> list:
        """The cached KV for `step.slot_ids`, in that order (a Gather when rows were dropped)."""
        if self.past is None or step.past_len != self.cached_len:
            raise MiniEngineError(f"step expects {step.past_len} cached positions but the onnxruntime cache "
                                  f"holds {self.cached_len}; every step after the first must continue the last")
        wanted = list(step.slot_ids)
        if wanted == self.layout:
            return self.past
        missing = [s for s in wanted if s not in self.layout]
        if missing:
            raise MiniEngineError(f"slot {missing[0]} has no cached KV (it was not in the previous step)")
        rows = np.array([self.layout.index(s) for s in wanted], dtype=np.int64)
        io = self.gather.io_binding()
        io.bind_cpu_input("rows", rows)
        for i, value in enumerate(self.past):
            io.bind_ortvalue_input(f"in{i}", value)
            io.bind_output(f"out{i}", self.device_kind, self.device_id)
        self.gather.run_with_iobinding(io)
        return io.get_outputs()

    def describe(self) -> dict:
        info = super().describe()
        if self.is_loaded:
            import onnxruntime

            session = self.gqa_session or self.session
            q = self.quantization
            info.update(onnxruntime=onnxruntime.__version__, providers=session.get_providers(),
                        onnx=str(self.onnx_file), precision=self.precision, dtype=self.precision,
                        quantization=None if q is None else {
                            k: q.get(k) for k in ("method", "bits", "block_size", "lm_head", "symmetric",
                                                  "accuracy_level", "quantized_nodes", "quantized_ops",
                                                  "activations", "scales", "description")},
                        weight_bytes_per_step=self.weight_bytes, spinning=self.spinning,
                        kv_cache="gqa-v1 (continuous batching)" if self.gqa_export is not None else "concat-v1",
                        static_export=str(self.export.model_file) if self.export is not None else "on first use",
                        optimization=self.export.data.get("optimization") if self.export is not None else None)
        return info
