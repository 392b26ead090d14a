"""The torch backend's paged-attention kernel against plain numpy attention over the same tokens.

A mixed step (decodes, a prefill chunk, a row whose context ends mid-block), on one thread and
split over several (by whole tokens), with large stale values in the slots a row does not own,
and scores that grow block after block (the online softmax's rescale path).
"""
import numpy as np
import pytest

pa = pytest.importorskip("mini_engine_backends.pytorch.paged_attention")

H, D, BS = 4, 16, 4


def reference(q, k_rows, v_rows, query_start, context_lens, scale):
    out = np.empty_like(q)
    for r in range(len(context_lens)):
        for t in range(query_start[r], query_start[r + 1]):
            n = context_lens[r] + (t - query_start[r]) + 1
            for h in range(H):
                s = (k_rows[r][:n, h] @ q[t, h]) * scale
                p = np.exp(s - s.max())
                out[t, h] = (p / p.sum()) @ v_rows[r][:n, h]
    return out


def build(contexts, new_tokens, rng, growing=False):
    """Pool, block tables and slots for rows that hold `contexts` tokens and add `new_tokens` each."""
    blocks_per_row = [-(-(c + n) // BS) for c, n in zip(contexts, new_tokens)]
    num_blocks = sum(blocks_per_row) + 3
    keys, values = pa.allocate_pool(1, num_blocks, H, BS, D)
    # Stale values everywhere: K = 0 gives an over-read slot a real softmax weight whatever q's sign,
    # and V = 1e4 then shows in the output.
    keys[0][...] = 0.0
    values[0][...] = 1e4
    order = rng.permutation(num_blocks)
    tables = np.full((len(contexts), max(blocks_per_row)), -1, np.int32)  # -1 past a row's blocks
    k_rows, v_rows, slots, q, k_new, v_new = [], [], [], [], [], []
    at = 0
    for r, (c, n) in enumerate(zip(contexts, new_tokens)):
        tables[r, :blocks_per_row[r]] = order[at:at + blocks_per_row[r]]
        at += blocks_per_row[r]
        kr = rng.standard_normal((c + n, H, D)).astype(np.float32)
        if growing:  # later keys align better with q: the running max rises block after block
            kr += np.linspace(0, 3, c + n, dtype=np.float32)[:, None, None]
        vr = rng.standard_normal((c + n, H, D)).astype(np.float32)
        for t in range(c):
            blk, off = tables[r, t // BS], t % BS
            keys[0][blk, off], values[0][blk, off] = kr[t], vr[t]  # the kernel's pool is token-major
        for t in range(c, c + n):
            slots.append(tables[r, t // BS] * BS + t % BS)
        k_rows.append(kr)
        v_rows.append(vr)
        k_new.append(kr[c:])
        v_new.append(vr[c:])
        q.append(rng.standard_normal((n, H, D)).astype(np.float32) + (1.0 if growing else 0.0))
    query_start = np.concatenate([[0], np.cumsum(new_tokens)]).astype(np.int64)
    step = type("Step", (), dict(slot_mapping=np.array(slots, np.int64), block_tables=tables,
                                 query_start=query_start, context_lens=np.array(contexts, np.int64),
                                 block_size=BS))
    return keys, values, step, np.concatenate(q), np.concatenate(k_new), np.concatenate(v_new), k_rows, v_rows


@pytest.mark.parametrize("threads,min_split", [(1, 20_000), (2, 0)])
@pytest.mark.parametrize("growing", [False, True])
def test_mixed_step_matches_numpy(monkeypatch, threads, min_split, growing):
    monkeypatch.setattr(pa, "MIN_SPLIT_KEYS", min_split)
    rng = np.random.default_rng(0)
    contexts, new_tokens = [0, 5, 8, 13, 30], [6, 1, 1, 3, 1]  # a prompt chunk, decodes, a later chunk
    keys, values, step, q, k, v, k_rows, v_rows = build(contexts, new_tokens, rng, growing)
    kv = pa.PagedKV(keys, values, step, H, D, threads)
    assert (len(kv.edges) - 1) == (threads if min_split == 0 else 1)
    got = kv.attend_np(0, q, k, v)
    want = reference(q, k_rows, v_rows, step.query_start, step.context_lens, np.float32(1 / np.sqrt(D)))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def run(contexts, new_tokens, threads, seed=0):
    rng = np.random.default_rng(seed)
    keys, values, step, q, k, v, k_rows, v_rows = build(contexts, new_tokens, rng)
    kv = pa.PagedKV(keys, values, step, H, D, threads)
    got = kv.attend_np(0, q, k, v)
    want = reference(q, k_rows, v_rows, step.query_start, step.context_lens, np.float32(1 / np.sqrt(D)))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    return kv, got


@pytest.mark.parametrize("contexts,new_tokens,threads,edges", [
    ([40, 2, 3], [1, 1, 1], 2, [0, 1, 3]),        # a long row beside short decodes: a share of its own
    ([60, 1, 1, 1, 1], [1] * 5, 2, [0, 1, 5]),
    ([9, 20, 9, 20], [1, 1, 1, 1], 2, [0, 2, 4]),  # equal halves of the keys
    ([9, 20, 30], [1, 1, 1], 3, [0, 2, 3]),        # 3 threads, but the last row holds half the keys
    ([5, 7], [1, 1], 8, [0, 1, 2]),                # more threads than tokens: a share per token
])
def test_splits_keep_tokens_whole_and_match_numpy_and_one_thread(monkeypatch, contexts, new_tokens, threads, edges):
    monkeypatch.setattr(pa, "MIN_SPLIT_KEYS", 0)
    kv, got = run(contexts, new_tokens, threads)
    assert kv.edges == edges
    _, one = run(contexts, new_tokens, 1)
    np.testing.assert_array_equal(got, one)  # the same arithmetic per token, whatever the split


def test_a_single_token_runs_on_one_thread(monkeypatch):
    monkeypatch.setattr(pa, "MIN_SPLIT_KEYS", 0)
    rng = np.random.default_rng(1)
    keys, values, step, q, k, v, k_rows, v_rows = build([21], [1], rng)
    kv = pa.PagedKV(keys, values, step, H, D, 2)
    assert kv.edges == [0, 1]  # its heads stay together (see split_units)
    got = kv.attend_np(0, q, k, v)
    want = reference(q, k_rows, v_rows, step.query_start, step.context_lens, np.float32(1 / np.sqrt(D)))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-5), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("growing", [False, True])
def test_torch_ops_path_matches_numpy(dtype, tol, growing):
    """paged_sdpa.TorchPagedKV (CUDA's and bfloat16's path, run here on CPU) on the same mixed step:
    decodes batched, each chunk on its own, -1 past a row's blocks, stale K 0 / V 1e4 elsewhere."""
    import torch

    from mini_engine_backends.pytorch.paged_sdpa import TorchPagedKV

    rng = np.random.default_rng(0)
    contexts, new_tokens = [0, 5, 8, 13, 30], [6, 1, 1, 3, 1]
    keys, values, step, q, k, v, k_rows, v_rows = build(contexts, new_tokens, rng, growing)
    tdt = getattr(torch, dtype)
    # The torch-ops pool is head-major: [num_blocks, n_head, block_size, head_dim].
    tk = [torch.from_numpy(a.transpose(0, 2, 1, 3).copy()).to(tdt) for a in keys]
    tv = [torch.from_numpy(a.transpose(0, 2, 1, 3).copy()).to(tdt) for a in values]
    kv = TorchPagedKV(tk, tv, step, D)
    assert len(kv.groups) == 3  # the three decode rows together, the two chunks alone
    got = kv.attend(0, *(torch.from_numpy(a).to(tdt) for a in (q, k, v))).float().numpy()
    want = reference(q, k_rows, v_rows, step.query_start, step.context_lens, np.float32(1 / np.sqrt(D)))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    # The new tokens landed at their slots, as the kernel's write_kv puts them.
    blk, off = step.slot_mapping // BS, step.slot_mapping % BS
    np.testing.assert_allclose(tk[0][blk, :, off].float().numpy(), k, rtol=tol, atol=tol)
