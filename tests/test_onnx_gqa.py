"""The GroupQueryAttention graph (mini_engine_export.onnx_gqa) in a real ONNX Runtime session vs the
PyTorch forward, and the ONNX Runtime behaviours a continuous-batching runner relies on."""
import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")

from mini_engine_export import onnx_gqa as gqa  # noqa: E402

SENTINEL = 7.0


@pytest.fixture(scope="session")
def tiny():
    from mini_engine.model.source import resolve_model
    from mini_engine.model.weights import build_model

    return build_model(resolve_model("random:tiny"))


@pytest.fixture(scope="session")
def tiny_graph(tiny, tmp_path_factory):
    path = gqa.build_gqa_graph(tiny, tmp_path_factory.mktemp("gqa") / "tiny.onnx")
    return path, gqa.cpu_session(path)


def torch_last_logits(model, tokens):
    import torch

    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits, present = model(ids, torch.arange(len(tokens))[None], torch.ones_like(ids))
    return logits[0, -1].numpy(), present


def test_contract(tiny_graph):
    path, session = tiny_graph
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["mini_engine.contract"] == gqa.CONTRACT and meta["n_layer"] == "2"
    names = [i.name for i in session.get_inputs()]
    assert names == ["input_ids", "position_ids", "seqlens_k", "total_sequence_length", "query_lens",
                     "past_key.0", "past_value.0", "past_key.1", "past_value.1"]
    assert [o.name for o in session.get_outputs()] == ["logits", "present_key.0", "present_value.0",
                                                       "present_key.1", "present_value.1"]
    shapes = {i.name: i.shape for i in session.get_inputs()} | {o.name: o.shape for o in session.get_outputs()}
    assert shapes["past_key.1"] == shapes["present_value.0"] == ["batch", 4, "capacity", 16]
    assert shapes["logits"] == ["batch", 50257] and shapes["total_sequence_length"] == []
    assert sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) == 2
    # The lm_head reads the embedding itself; no transposed copy of it.
    assert [list(t.dims) for t in model.graph.initializer if 50257 in t.dims] == [[50257, 64]]


@pytest.mark.parametrize("gelu", gqa.GELU_MODES)
def test_scenario_matches_torch(tiny, tmp_path, gelu):
    """Ragged prefill, ragged decode, a mixed chunk/decode/idle step, a bound sub-range of rows."""
    path = gqa.build_gqa_graph(tiny, tmp_path / f"{gelu}.onnx", gelu=gelu)
    results = gqa.validate_gqa_graph(path, tiny)
    assert len(results) == len(gqa.SCENARIO)
    assert all(r.passed for r in results), [(r.step, r.logits_diff, r.kv_diff) for r in results]
    assert max(r.logits_diff for r in results) < 1e-5
    assert results[4].rows == (1, 3) and results[5].rows == (2, 3)


def test_shared_buffer_is_written_in_place(tiny, tiny_graph):
    """present_* is the bound buffer itself; only [past, past + n) of each row changes, pads never land."""
    _, session = tiny_graph
    cfg = tiny.cfg
    kv = gqa.GqaKV.allocate(cfg, 3, 24)
    for buf in kv.keys + kv.values:
        buf[:] = SENTINEL
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8]]
    feeds = gqa.step_inputs(prompts, [0, 0, 0], kv.capacity, cfg.n_positions)
    io = session.io_binding()
    for name, array in feeds.items():
        io.bind_cpu_input(name, array)
    io.bind_output("logits", "cpu")
    bound = kv.bind(io, 0, 3)
    session.run_with_iobinding(io)
    outputs = io.get_outputs()
    assert [o.data_ptr() for o in outputs[1:]] == [v.data_ptr() for v in bound]
    assert outputs[1].data_ptr() == kv.keys[0].ctypes.data
    for b, prompt in enumerate(prompts):
        ref, present = torch_last_logits(tiny, prompt)
        np.testing.assert_allclose(outputs[0].numpy()[b], ref, atol=1e-5)
        for i in range(cfg.n_layer):
            np.testing.assert_allclose(kv.keys[i][b, :, :len(prompt)], present[i][0][0].numpy(), atol=1e-5)
            assert (kv.keys[i][b, :, len(prompt):] == SENTINEL).all()
            assert (kv.values[i][b, :, len(prompt):] == SENTINEL).all()


def test_sub_range_leaves_other_rows_alone(tiny, tiny_graph):
    _, session = tiny_graph
    kv = gqa.GqaKV.allocate(tiny.cfg, 5, 16)
    for buf in kv.keys + kv.values:
        buf[:] = SENTINEL
    prompts = [[11, 12, 13], [14]]
    logits = gqa.run_step(session, kv, gqa.step_inputs(prompts, [0, 0], 16, tiny.cfg.n_positions), lo=2)
    for j, prompt in enumerate(prompts):
        np.testing.assert_allclose(logits[j], torch_last_logits(tiny, prompt)[0], atol=1e-5)
    for buf in kv.keys + kv.values:
        assert (buf[[0, 1, 4]] == SENTINEL).all()
        assert not (buf[2:4, :, 0] == SENTINEL).any()


def test_long_decode_then_chunk_against_capacity(tiny, tiny_graph):
    """Rows at very different lengths decode together; a row can be filled exactly to capacity."""
    _, session = tiny_graph
    cfg, cap = tiny.cfg, 40
    kv = gqa.GqaKV.allocate(cfg, 2, cap)
    rng = np.random.default_rng(3)
    hist = [rng.integers(0, cfg.vocab_size, 30).tolist(), rng.integers(0, cfg.vocab_size, 2).tolist()]
    gqa.run_step(session, kv, gqa.step_inputs(hist, [0, 0], cap, cfg.n_positions))
    for _ in range(6):
        new = [[int(rng.integers(cfg.vocab_size))] for _ in hist]
        logits = gqa.run_step(session, kv, gqa.step_inputs(new, [len(h) for h in hist], cap, cfg.n_positions))
        for b in range(2):
            hist[b] += new[b]
            np.testing.assert_allclose(logits[b], torch_last_logits(tiny, hist[b])[0], atol=1e-5)
    # Row 0 holds 36: a 4-token chunk fills it to 40 while row 1 idles.
    chunk = rng.integers(0, cfg.vocab_size, 4).tolist()
    logits = gqa.run_step(session, kv, gqa.step_inputs([chunk, []], [36, 8], cap, cfg.n_positions))
    np.testing.assert_allclose(logits[0], torch_last_logits(tiny, hist[0] + chunk)[0], atol=1e-5)
    with pytest.raises(ValueError, match="exceed the cache capacity"):
        gqa.step_inputs([[1], [2, 3]], [39, 3], cap, cfg.n_positions)


def test_padded_chunk_must_fit_in_capacity_even_its_pads(tiny, tiny_graph):
    """ONNX Runtime itself refuses a step whose padded chunk would run past the buffer."""
    _, session = tiny_graph
    kv = gqa.GqaKV.allocate(tiny.cfg, 2, 16)
    feeds = gqa.step_inputs([[1], [2, 3, 4]], [0, 0], 16, tiny.cfg.n_positions)
    feeds["seqlens_k"] = np.array([14, 2], np.int32)  # row 0 claims 14 cached: 14 + 3 > 16
    with pytest.raises(Exception, match="does not fit in the KV cache capacity"):
        gqa.run_step(session, kv, feeds)


def test_external_data(tiny, tmp_path):
    path = gqa.build_gqa_graph(tiny, tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size > 12_000_000 > path.stat().st_size
    assert all(r.passed for r in gqa.validate_gqa_graph(path, tiny, scenario=((3, 1), (1, 1))))


def test_numpy_views_alias_only_when_contiguous():
    """The runner binds buf[lo:hi]; a non-contiguous view would be silently copied (writes lost)."""
    buf = np.zeros((4, 2, 8, 8), np.float32)
    view = buf[1:3]
    assert ort.OrtValue.ortvalue_from_numpy(view).data_ptr() == view.ctypes.data
    strided = buf[::2]
    assert ort.OrtValue.ortvalue_from_numpy(strided).data_ptr() != strided.ctypes.data


def test_batched_chunk_needs_query_lens():
    """Why the graph always takes query_lens: without GQA's query_seqlens input, ORT rejects
    S > 1 with a non-empty past unless batch is 1 (no batched chunked prefill)."""
    from onnx import TensorProto as TP
    from onnx import helper

    h, d, cap = 2, 8, 8
    ins = [helper.make_tensor_value_info("qkv", TP.FLOAT, ["B", "S", 3 * h * d]),
           helper.make_tensor_value_info("pk", TP.FLOAT, ["B", h, cap, d]),
           helper.make_tensor_value_info("pv", TP.FLOAT, ["B", h, cap, d]),
           helper.make_tensor_value_info("seqlens_k", TP.INT32, ["B"]),
           helper.make_tensor_value_info("total", TP.INT32, [])]
    outs = [helper.make_tensor_value_info(n, TP.FLOAT, None) for n in ("out", "prk", "prv")]
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "seqlens_k", "total"],
                            ["out", "prk", "prv"], domain="com.microsoft", num_heads=h, kv_num_heads=h)
    model = helper.make_model(helper.make_graph([node], "g", ins, outs),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    so = ort.SessionOptions()
    so.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"qkv": np.zeros((2, 2, 3 * h * d), np.float32), "pk": np.zeros((2, h, cap, d), np.float32),
             "pv": np.zeros((2, h, cap, d), np.float32), "seqlens_k": np.array([3, 4], np.int32),
             "total": np.array(5, np.int32)}
    with pytest.raises(Exception, match="batch_size must be 1"):
        session.run(None, feeds)
    feeds = {k: v[:1] if v.ndim else v for k, v in feeds.items()}
    session.run(None, feeds)  # batch 1 is accepted
