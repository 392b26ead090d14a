"""GPT-2 as an ONNX graph for continuous batching: `com.microsoft.GroupQueryAttention` per layer
with a KV cache that lives in caller-owned buffers and is written in place.

Unlike the torch.onnx export (`onnx_export.py`, present = past ++ new, so every step copies the
whole cache), this graph is written node by node from the weights, and its attention reads and
appends to fixed-capacity buffers that the caller binds both as `past_*` and as `present_*`
(ONNX Runtime's past_present_share_buffer mode). Rows of one step may have different cached
lengths and different numbers of new tokens.

I/O contract ("gqa-v1", also in the model's metadata_props):

    inputs   input_ids              int64   [B, S]      new tokens, right-padded to S = max new tokens
             position_ids           int64   [B, S]      absolute positions (past_b + s); pads: any valid id
             seqlens_k              int32   [B]         past_b + n_b - 1  (cache length after the step - 1;
                                                        max(past_b - 1, 0) for an idle row, n_b = 0)
             total_sequence_length  int32   []          upper bound of seqlens_k + 1: pass the capacity C
             query_lens             int32   [B]         n_b, valid new tokens of row b (0 = idle row)
             past_key.{i}           float32 [B, H, C, D] layer i's key buffer  (also past_value.{i})
    outputs  logits                 float32 [B, V]      at row b's last valid new token (n_b - 1);
                                                        meaningless for idle rows
             present_key.{i}        float32 [B, H, C, D] bind the OrtValue bound as past_key.{i}
                                                        (also present_value.{i})

H = n_head, D = head_dim, C = the buffers' capacity (a runtime dimension). Row b's cache holds
positions [0, past_b) before the step; the step writes its n_b valid tokens at [past_b,
past_b + n_b) and nothing else (padding never enters the cache). Constraints ONNX Runtime
enforces (the run fails): past_b + n_b <= total_sequence_length <= C and past_b + S <= C for every
row (the padded chunk must fit, even its pad part). Needs an onnxruntime whose GroupQueryAttention
has the `query_seqlens` input (1.32 does; `runtime_problem()` checks).

One call covers every phase: prefill of ragged prompts (past = 0), decode (S = 1), chunked
prefill, and any mix of them in one step (S = max n_b, short rows right-padded). When the step
has fewer rows than the buffers, bind a contiguous row range `buf[lo:hi]` (an axis-0 slice of a
C-contiguous array is contiguous, and `OrtValue.ortvalue_from_numpy` then aliases it; on a
non-contiguous array it silently copies, and the step's writes are lost).

`GqaKV`, `step_inputs` and `run_step` below drive the graph this way on CPU (for the tests,
the benchmark and as the reference for a runner); `validate_gqa_graph` checks it against the
PyTorch forward.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

CONTRACT = "gqa-v1"
DEFAULT_OPSET = 17  # LayerNormalization is one op from 17 on
GELU_MODES = ("fastgelu", "formula", "gelu20")
# Protobuf cannot serialize more than 2 GB; leave headroom for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000
TOLERANCE = 1e-4  # max |logits diff| relative to max(1, max |logits|), float32


def build_gqa_graph(model, path, *, gelu: str = "fastgelu", opset: int = DEFAULT_OPSET,
                    external_data: bool | None = None) -> Path:
    """Write the GQA graph of `model` (a GPT2 module, a ModelSource or a model spec) to `path`.

    `gelu`: "fastgelu" (com.microsoft.FastGelu with the c_fc bias fused; the default: on this
    project's CPU it and "gelu20" take half the time of "formula" on [256, 3072]), "formula" (the
    tanh formula in plain ops, which ORT 1.32 does not fuse) or "gelu20" (ONNX Gelu
    approximate="tanh", raises the opset to 20). `external_data`: weights in `<name>.data` beside
    the graph; None = only when they would not fit in one protobuf. Returns the path written.
    """
    import onnx

    if gelu not in GELU_MODES:
        raise ValueError(f"gelu must be one of {', '.join(GELU_MODES)}, got {gelu!r}")
    if gelu == "gelu20" and opset < 20:
        opset = 20
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (LayerNormalization), got {opset}")
    module = _torch_module(model)
    cfg = module.cfg
    weights = {name: t.detach().float().cpu().numpy() for name, t in module.state_dict().items()}
    proto = _graph(cfg, weights, gelu, opset)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = sum(w.nbytes for w in weights.values()) > EXTERNAL_DATA_BYTES
    # Write under a temporary name and rename last, so an interrupted build never leaves a
    # graph that looks complete.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data_name = path.name + ".data"
    if external_data:
        if (path.parent / data_name).exists():
            (path.parent / data_name).unlink()  # onnx appends to an existing data file
        onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(tmp))
    onnx.checker.check_model(str(tmp))
    os.replace(tmp, path)
    return path


def _torch_module(model):
    from mini_engine.model.gpt2 import GPT2

    if isinstance(model, GPT2):
        return model
    from mini_engine.model.source import ModelSource, resolve_model
    from mini_engine.model.weights import build_model

    source = resolve_model(model) if isinstance(model, str) else model
    if not isinstance(source, ModelSource):
        raise TypeError(f"expected a GPT2 module, a ModelSource or a model spec, got {type(model).__name__}")
    return build_model(source, "float32", "cpu")


def _graph(cfg, w: dict[str, np.ndarray], gelu: str, opset: int):
    from onnx import TensorProto, helper, numpy_helper

    d, n_head, head_dim = cfg.n_embd, cfg.n_head, cfg.head_dim
    if head_dim % 8:
        raise ValueError(f"GroupQueryAttention needs head_dim % 8 == 0, got {head_dim}")
    nodes, inits = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(op, inputs, output=None, domain="", **attrs):
        out = output or f"{op}_{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [out], name=out, domain=domain, **attrs))
        return out

    def dense(x, prefix, bias=True):
        """x @ W^T + b on [tokens, in]; bias=False leaves the bias to the next op.

        Gemm with transB=1 reads nn.Linear's [out, in] weight as stored. (MatMul + Add with a
        transposed copy ends up the same: ORT's optimizer rewrites it into this Gemm.)
        """
        args = [x, const(prefix + ".weight", w[prefix + ".weight"])]
        if bias:
            args.append(const(prefix + ".bias", w[prefix + ".bias"]))
        return node("Gemm", args, prefix, transB=1)

    def layer_norm(x, prefix):
        return node("LayerNormalization", [x, const(prefix + ".weight", w[prefix + ".weight"]),
                                           const(prefix + ".bias", w[prefix + ".bias"])],
                    prefix, axis=-1, epsilon=cfg.layer_norm_epsilon)

    def tanh_gelu(x, prefix):
        """GPT-2's gelu_new on the c_fc output (without its bias for FastGelu, with it otherwise)."""
        if gelu == "fastgelu":
            # FastGelu takes the c_fc bias as its second input: one pass instead of Add + activation.
            return node("FastGelu", [x, const(prefix + ".bias", w[prefix + ".bias"])], prefix + ".gelu",
                        domain="com.microsoft")
        if gelu == "gelu20":
            return node("Gelu", [x], prefix + ".gelu", approximate="tanh")
        def f32(v):
            return const(f"{prefix}.c{len(inits)}", np.array(v, np.float32))

        cube = node("Mul", [node("Mul", [x, x]), x])
        inner = node("Mul", [node("Add", [x, node("Mul", [cube, f32(0.044715)])]), f32(np.sqrt(2.0 / np.pi))])
        half = node("Mul", [x, f32(0.5)])
        return node("Mul", [half, node("Add", [node("Tanh", [inner]), f32(1.0)])], prefix + ".gelu")

    def i64(name, v):
        return const(name, np.array(v, np.int64))

    flat_shape, chunk_tail = i64("shape_tokens_embd", [-1, d]), i64("shape_tail", [-1])
    # [B, S, -1] from input_ids: GroupQueryAttention wants (batch, seq, hidden) while every other
    # op is per token and runs on the flat [B*S, hidden] view (Reshape aliases, no copy).
    bs_shape = node("Concat", [node("Shape", ["input_ids"]), chunk_tail], "shape_bs_tail", axis=0)

    tok = node("Gather", [const("wte.weight", w["wte.weight"]), "input_ids"], "tok_emb")
    pos = node("Gather", [const("wpe.weight", w["wpe.weight"]), "position_ids"], "pos_emb")
    x = node("Reshape", [node("Add", [tok, pos], "emb"), flat_shape], "h_in")
    for i in range(cfg.n_layer):
        p = f"h.{i}"
        qkv = dense(layer_norm(x, f"{p}.ln_1"), f"{p}.attn.c_attn")
        # GPT-2's c_attn output is [q | k | v], each head-major: exactly GQA's packed-QKV layout.
        qkv = node("Reshape", [qkv, bs_shape], f"{p}.attn.qkv_bsd")
        gqa_inputs = [qkv, "", "", f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_sequence_length"]
        gqa_inputs += [""] * 9 + ["query_lens"]  # query_seqlens is GQA's 17th input
        attn = f"{p}.attn.gqa"
        outs = [attn, f"present_key.{i}", f"present_value.{i}"]
        nodes.append(helper.make_node("GroupQueryAttention", gqa_inputs, outs, name=attn, domain="com.microsoft",
                                      num_heads=n_head, kv_num_heads=n_head))
        attn = node("Reshape", [attn, flat_shape], f"{p}.attn.flat")
        x = node("Add", [x, dense(attn, f"{p}.attn.c_proj")], f"{p}.res_attn")
        fc = dense(layer_norm(x, f"{p}.ln_2"), f"{p}.mlp.c_fc", bias=gelu != "fastgelu")
        x = node("Add", [x, dense(tanh_gelu(fc, f"{p}.mlp.c_fc"), f"{p}.mlp.c_proj")], f"{p}.res_mlp")

    # Only each row's last valid token reaches ln_f and the lm_head: 2 x S x d x V FLOPs per row
    # saved at prefill, and rows are right-padded so that token sits at query_lens - 1.
    last = node("Max", [node("Sub", ["query_lens", const("one_i32", np.array(1, np.int32))]),
                        const("zero_i32", np.array(0, np.int32))], "last_index_i32")
    last = node("Unsqueeze", [node("Cast", [last], "last_index", to=TensorProto.INT64), i64("axis_1", [1])],
                "last_index_b1")
    x_last = node("GatherND", [node("Reshape", [x, bs_shape], "h_bsd"), last], "h_last", batch_dims=1)
    node("Gemm", [layer_norm(x_last, "ln_f"), "wte.weight"], "logits", transB=1)

    f, i32, i64t = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
    vi = helper.make_tensor_value_info
    cache = ["batch", n_head, "capacity", head_dim]
    inputs = [vi("input_ids", i64t, ["batch", "seq"]), vi("position_ids", i64t, ["batch", "seq"]),
              vi("seqlens_k", i32, ["batch"]), vi("total_sequence_length", i32, []),
              vi("query_lens", i32, ["batch"])]
    outputs = [vi("logits", f, ["batch", cfg.vocab_size])]
    for i in range(cfg.n_layer):
        inputs += [vi(f"past_key.{i}", f, cache), vi(f"past_value.{i}", f, cache)]
        outputs += [vi(f"present_key.{i}", f, cache), vi(f"present_value.{i}", f, cache)]
    graph = helper.make_graph(nodes, "gpt2_gqa", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, producer_name="mini-engine", opset_imports=[
        helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9  # onnx 1.23 would stamp a newer IR than some runtimes load; 9 is all this uses
    meta = {"mini_engine.contract": CONTRACT, "n_layer": cfg.n_layer, "n_head": n_head, "head_dim": head_dim,
            "n_embd": d, "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions,
            "gelu": gelu}
    helper.set_model_props(model, {k: str(v) for k, v in meta.items()})
    return model


# ----- driving the graph (CPU, numpy buffers) -----------------------------------------------------

@dataclass
class GqaKV:
    """Per-layer K and V buffers [slots, n_head, capacity, head_dim], written in place by the graph."""

    n_layer: int
    keys: list[np.ndarray] = field(repr=False)
    values: list[np.ndarray] = field(repr=False)

    @classmethod
    def allocate(cls, cfg, slots: int, capacity: int) -> "GqaKV":
        # One allocation per kind; each layer's [slots, H, C, D] is a C-contiguous sub-array, and so
        # is any row range of it, which is what lets a step bind rows [lo, hi) without a copy.
        shape = (cfg.n_layer, slots, cfg.n_head, capacity, cfg.head_dim)
        k, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
        return cls(cfg.n_layer, list(k), list(v))

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def bind(self, io, lo: int, hi: int) -> list:
        """Bind rows [lo, hi) of every layer as past_* and present_* (the same OrtValue)."""
        from onnxruntime import OrtValue

        bound = []
        for i in range(self.n_layer):
            for kind, buf in (("key", self.keys[i]), ("value", self.values[i])):
                value = OrtValue.ortvalue_from_numpy(buf[lo:hi])
                io.bind_ortvalue_input(f"past_{kind}.{i}", value)
                io.bind_ortvalue_output(f"present_{kind}.{i}", value)
                bound.append(value)
        return bound  # the OrtValues must outlive the run


def step_inputs(new_tokens: Sequence[Sequence[int]], past_lens: Sequence[int], capacity: int,
                n_positions: int) -> dict[str, np.ndarray]:
    """Feeds for one step: row b appends `new_tokens[b]` (possibly none) to `past_lens[b]` cached tokens."""
    if len(new_tokens) != len(past_lens) or not new_tokens:
        raise ValueError("one past length per row, and at least one row")
    counts = [len(t) for t in new_tokens]
    seq = max(max(counts), 1)
    rows = len(new_tokens)
    ids = np.zeros((rows, seq), np.int64)
    pos = np.zeros((rows, seq), np.int64)
    for b, (tokens, past) in enumerate(zip(new_tokens, past_lens)):
        if past + seq > capacity:
            raise ValueError(f"row {b}: {past} cached + {seq} padded new tokens exceed the cache capacity {capacity}")
        if past + len(tokens) > n_positions:
            raise ValueError(f"row {b}: position {past + len(tokens) - 1} is beyond the model's {n_positions}")
        ids[b, :len(tokens)] = tokens
        pos[b, :len(tokens)] = np.arange(past, past + len(tokens))
    seqlens = [max(p + n - 1, 0) for p, n in zip(past_lens, counts)]
    return {"input_ids": ids, "position_ids": pos, "seqlens_k": np.array(seqlens, np.int32),
            "total_sequence_length": np.array(capacity, np.int32), "query_lens": np.array(counts, np.int32)}


def run_step(session, kv: GqaKV, feeds: dict[str, np.ndarray], lo: int = 0) -> np.ndarray:
    """Run one step on cache rows [lo, lo + batch); returns logits [batch, vocab]."""
    io = session.io_binding()
    for name, array in feeds.items():
        io.bind_cpu_input(name, array)
    io.bind_output("logits", "cpu")  # first, so it is get_outputs()[0] (outputs come in binding order)
    keep = kv.bind(io, lo, lo + feeds["input_ids"].shape[0])
    session.run_with_iobinding(io)
    del keep
    return io.get_outputs()[0].numpy()


@functools.lru_cache(maxsize=1)
def runtime_problem() -> str | None:
    """Why this onnxruntime cannot run the graph, or None.

    The graph feeds GroupQueryAttention's `query_seqlens` (its 17th input), the only way ORT
    accepts batched multi-token steps with a non-empty cache; a runtime whose schema lacks it
    refuses to load the model. 1.32 has it.
    """
    try:
        import onnxruntime as ort
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        schemas = [s for s in C.get_all_operator_schema()
                   if s.name == "GroupQueryAttention" and s.domain == "com.microsoft"]
    except (ImportError, AttributeError) as e:
        return f"cannot inspect onnxruntime's operator schemas ({e})"
    if not schemas:
        return f"onnxruntime {ort.__version__} has no com.microsoft GroupQueryAttention"
    if not any(i.name == "query_seqlens" for s in schemas for i in s.inputs):
        return (f"onnxruntime {ort.__version__}'s GroupQueryAttention has no query_seqlens input "
                f"(1.32 has it); upgrade onnxruntime")
    return None


def cpu_session(path, threads: int = 0, spinning: bool = False):
    """A CPU session; spinning off by default, so several sessions in one process do not busy-wait
    against each other between runs."""
    import onnxruntime as ort

    problem = runtime_problem()
    if problem:
        raise RuntimeError(problem)

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    flag = "1" if spinning else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", flag)
    so.add_session_config_entry("session.inter_op.allow_spinning", flag)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# ----- validation against the PyTorch forward -------------------------------------------------------

# Each step gives every row a number of new tokens (0 = idle). Rows start empty, so step 0 is a
# prefill of ragged prompts; then decode with ragged lengths, a mixed step (chunks, a decode row,
# an idle row), decode on the inner rows only (a bound sub-range), a one-row chunk, more decode.
SCENARIO = ((5, 1, 9, 3), (1, 1, 1, 1), (1, 1, 1, 1), (3, 1, 0, 2), (0, 1, 1, 0), (0, 0, 4, 0),
            (1, 1, 1, 1), (1, 0, 1, 1))


@dataclass
class StepResult:
    step: int
    new_tokens: tuple
    rows: tuple  # cache rows the step ran on
    logits_diff: float
    kv_diff: float
    tol: float
    rel_err: float = 0.0  # onnx_quantize.logit_stats' relative logit error of the step's active rows
    top1: float = 1.0
    precision: str = "float32"

    @property
    def passed(self) -> bool:
        if self.precision != "float32":  # quantized: within quantization error (onnx_quantize.LIMITS)
            from .onnx_quantize import LIMITS

            return self.rel_err <= LIMITS[self.precision]["rel_err"]
        return self.logits_diff <= self.tol and self.kv_diff <= self.tol


@dataclass
class GqaValidation:
    """validate_gqa_graph's steps with the interface of validate.Report (table, summary, failure).

    A quantized graph (precision int8/int4) passes on its relative logit error per step and on
    `decode`, validate.DecodeCheck's teacher-forced top-1 agreement (onnx_quantize.LIMITS)."""

    steps: list[StepResult]
    precision: str = "float32"
    decode: object | None = None  # validate.DecodeCheck for quantized graphs

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.steps) and (self.decode is None or self.decode.passed)

    def failure(self) -> str:
        if self.precision != "float32":
            from .validate import quantized_failure

            worst = max(self.steps, key=lambda r: r.rel_err)
            return quantized_failure(self.precision, worst.rel_err, f"step {worst.step} (new tokens per row "
                                     f"{worst.new_tokens})", self.decode)
        r = max(self.steps, key=lambda r: max(r.logits_diff, r.kv_diff) / r.tol)
        return (f"step {r.step} (new tokens per row {r.new_tokens}): max |logits diff| {r.logits_diff:.2e}, "
                f"max |KV diff| {r.kv_diff:.2e} > {r.tol:.1e}")

    def table(self) -> str:
        quant = self.precision != "float32"
        if quant:
            from .onnx_quantize import LIMITS

            limit = LIMITS[self.precision]["rel_err"]
        lines = [f"validation vs the PyTorch forward ({self.precision} graph vs float32 forward, CPUExecutionProvider; "
                 "rows of one step have their own cached lengths and new-token counts):",
                 "step  new tokens per row  rows  max|dlogits|  max|dKV|  " +
                 ("rel.err  top-1  limit  result" if quant else "tolerance  result")]
        for r in self.steps:
            lead = (f"{r.step:>4}  {str(r.new_tokens):>18}  {r.rows[0]}:{r.rows[1]:<3} {r.logits_diff:>11.2e}  "
                    f"{r.kv_diff:>8.2e}  ")
            tail = (f"{r.rel_err:>7.4f}  {r.top1:>5.0%}  {limit:>5.2f}" if quant else f"{r.tol:>9.1e}")
            lines.append(lead + tail + f"  {'pass' if r.passed else 'FAIL'}")
        if self.decode is not None:
            lines.append(self.decode.line())
        return "\n".join(lines)

    def summary(self) -> dict:
        out = {"passed": self.passed, "provider": "CPUExecutionProvider", "cases": len(self.steps),
               "max_logits_diff": max((r.logits_diff for r in self.steps), default=0.0),
               "max_kv_diff": max((r.kv_diff for r in self.steps), default=0.0)}
        if self.precision != "float32":
            out.update(precision=self.precision, max_rel_err=max((r.rel_err for r in self.steps), default=0.0))
            if self.decode is not None:
                out["decode"] = self.decode.summary()
        return out


def validate_gqa_graph(path, model, scenario=SCENARIO, capacity: int = 32, seed: int = 0,
                       session=None, precision: str = "float32") -> list[StepResult]:
    """Run `scenario` through the graph and compare every active row with the PyTorch forward.

    The reference recomputes each row from scratch without padding (GPT2.forward over the row's
    whole history), so ragged rows, the shared buffer and the last-token gather are all checked.
    The step after the first runs on a contiguous sub-range of the rows when the scenario leaves
    outer rows idle, exercising a bound view of the buffers.
    """
    import torch

    module = _torch_module(model)
    cfg = module.cfg
    rows = len(scenario[0])
    session = session or cpu_session(path)
    kv = GqaKV.allocate(cfg, rows, capacity)
    rng = np.random.default_rng(seed)
    history: list[list[int]] = [[] for _ in range(rows)]
    results = []
    for step, counts in enumerate(scenario):
        active = [b for b, n in enumerate(counts) if n]
        lo, hi = (min(active), max(active) + 1) if step else (0, rows)
        new = [rng.integers(0, cfg.vocab_size, counts[b]).tolist() for b in range(lo, hi)]
        feeds = step_inputs(new, [len(history[b]) for b in range(lo, hi)], capacity, cfg.n_positions)
        logits = run_step(session, kv, feeds, lo)
        for b, tokens in zip(range(lo, hi), new):
            history[b] += tokens
        worst = kv_worst = 0.0
        scale = 1.0
        got_rows, ref_rows = [], []
        with torch.no_grad():
            for j, b in enumerate(range(lo, hi)):
                if not counts[b]:
                    continue
                ids = torch.tensor([history[b]])
                ref, present = module(ids, torch.arange(len(history[b]))[None], torch.ones_like(ids))
                ref = ref[0, -1].numpy()
                got_rows.append(logits[j])
                ref_rows.append(ref)
                scale = max(scale, float(np.abs(ref).max()))
                worst = max(worst, float(np.abs(logits[j] - ref).max()))
                n = len(history[b])
                for i, (k, v) in enumerate(present):
                    kv_worst = max(kv_worst, float(np.abs(kv.keys[i][b, :, :n] - k[0].numpy()).max()),
                                   float(np.abs(kv.values[i][b, :, :n] - v[0].numpy()).max()))
        from .onnx_quantize import logit_stats

        stats = logit_stats(np.stack(got_rows), np.stack(ref_rows))
        results.append(StepResult(step, tuple(counts), (lo, hi), worst, kv_worst, TOLERANCE * scale,
                                  stats["rel_err"], stats["top1"], precision))
    return results
