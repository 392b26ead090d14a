"""Per-token logprobs (SamplingParams.logprobs) and min_tokens, on continuous batching (torch and
onnxruntime) and the static path, checked against transformers on seeded tiny checkpoints."""
import json

import numpy as np
import pytest
import torch

from mini_engine.errors import ConfigError
from mini_engine.sampling import MAX_LOGPROBS, SamplingParams, sample_rows, token_logprobs

BACKENDS = ["torch", "onnxruntime"]
EOS = 50256


def engine_for(model_dir, backend, **scheduler):
    from mini_engine import Engine

    sections = {f"scheduler.{k}": v for k, v in scheduler.items()}
    return Engine.from_config(None, model=str(model_dir), backend=backend, **sections)


def hf_logprobs(hf_model, prompt_ids, generated):
    """transformers' log_softmax (float64 of its float32 logits) at each generated position: [n, V]."""
    ids = torch.tensor([list(prompt_ids) + list(generated)])
    with torch.no_grad():
        logits = hf_model(ids).logits[0, len(prompt_ids) - 1:-1]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


def run(engine, requests):
    """requests: {id: (prompt_ids, params)}, all added before the first step. Returns
    ({id: [RequestOutput, ...]}, {id: Completion})."""
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    outs, done = {rid: [] for rid in requests}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id].append(out)
            if out.finished:
                done[out.request_id] = out.completion
    return outs, done


def check_against(ref: np.ndarray, lps, k: int, tol: float = 1e-4):
    assert len(lps) == ref.shape[0]
    for j, lp in enumerate(lps):
        row = ref[j]
        assert lp.logprob == pytest.approx(row[lp.token_id], abs=tol)
        assert len(lp.top) == k
        if k:
            want = np.argsort(-row, kind="stable")[:k]
            assert [t for t, _ in lp.top] == want.tolist()
            assert [v for _, v in lp.top] == pytest.approx(row[want].tolist(), abs=tol)
            assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))  # best first


# ----- the numerics -----------------------------------------------------------------------------------
def test_token_logprobs_equal_log_softmax():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((4, 50257)) * 3).astype(np.float32)
    tokens = [5, 50256, int(logits[2].argmax()), 123]
    ks = [0, 3, 20, 1]
    got = token_logprobs(logits, tokens, ks)
    ref = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    for row, lp, t, k in zip(ref, got, tokens, ks):
        assert lp.token_id == t and lp.logprob == pytest.approx(row[t], abs=1e-6)
        want = np.argsort(-row)[:k]
        assert [i for i, _ in lp.top] == want.tolist()
        assert [v for _, v in lp.top] == pytest.approx(row[want].tolist(), abs=1e-6)
        assert all(type(i) is int and type(v) is float for i, v in lp.top)
        assert type(lp.token_id) is int and type(lp.logprob) is float
    # A large logit range stays finite and exact (max-shifted, summed in float64).
    big = np.array([[1000.0, 0.0, -1000.0]], np.float32)
    (lp,) = token_logprobs(big, [0], [3])
    assert lp.logprob == pytest.approx(0.0, abs=1e-9) and lp.top[1] == (1, pytest.approx(-1000.0))


def test_top_ties_are_best_first_then_lower_id():
    logits = np.array([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0]], np.float32)
    (lp,) = token_logprobs(logits, [4], [4])
    assert [t for t, _ in lp.top] == [1, 3, 4, 2]


def test_sample_rows_ban_never_gives_the_token_and_leaves_logits_alone():
    logits = np.array([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0], [3.0, 5.0, 1.0]], np.float32)
    before = logits.copy()
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=1.0, seed=0)]
    rngs = [None, None, np.random.default_rng(0)]
    for _ in range(20):
        out = sample_rows(logits, params, rngs, ban_rows=[0, 2], ban=1)
        assert out[0] == 2 and out[1] == 1 and out[2] != 1
    assert np.array_equal(logits, before)


def test_static_sampler_ban():
    from mini_engine.sampling import Sampler

    logits = np.array([[0.0, 5.0, 1.0], [4.0, 5.0, 1.0]], np.float32)
    before = logits.copy()
    assert Sampler(SamplingParams(), [None, None])(logits, [0, 1], ban=1).tolist() == [2, 0]
    hot = Sampler(SamplingParams(temperature=2.0), [0, 1])
    assert all(1 not in hot(logits, [0, 1], ban=1).tolist() for _ in range(30))
    assert np.array_equal(logits, before)


# ----- validation and config ----------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"logprobs": -1}, {"logprobs": MAX_LOGPROBS + 1}, {"logprobs": True},
                                {"logprobs": 2.5}, {"min_tokens": -1}, {"min_tokens": 9, "max_new_tokens": 8},
                                {"min_tokens": 1.0}])
def test_invalid_logprobs_and_min_tokens(kw):
    with pytest.raises(ConfigError, match="logprobs|min_tokens"):
        SamplingParams(**kw)


def test_generation_config_keys():
    from mini_engine import load_config

    cfg = load_config({"generation": {"logprobs": 3, "min_tokens": 2}}, ["generation.max_new_tokens=4"])
    assert cfg.generation.logprobs == 3 and cfg.generation.min_tokens == 2
    assert load_config().generation.logprobs is None and load_config().generation.min_tokens == 0
    with pytest.raises(ConfigError, match="logprobs must be an integer in 0..20"):
        load_config({"generation": {"logprobs": 21}})
    with pytest.raises(ConfigError, match="'generation.logprobs' expects an integer"):
        load_config({"generation": {"logprobs": "5"}})
    with pytest.raises(ConfigError, match=r"min_tokens must be an integer in 0..max_new_tokens \(4\)"):
        load_config({"generation": {"min_tokens": 5, "max_new_tokens": 4}})


# ----- logprobs through the engine ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_logprobs_match_transformers(hf_dir, hf_model, backend):
    """Rows with logprobs None, 0, 3 and 5 (one of them sampled) in one batch: each gets what it
    asked for, per increment and in the Completion, equal to transformers' log_softmax."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 50000, n).tolist() for n in (5, 11, 3, 17, 8)]
    asks = {"none": (prompts[0], SamplingParams(max_new_tokens=6, ignore_eos=True)),
            "k0": (prompts[1], SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=0)),
            "k3": (prompts[2], SamplingParams(max_new_tokens=7, ignore_eos=True, logprobs=3)),
            "k5": (prompts[3], SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=5)),
            # Sampled at a temperature: the logprobs are still of the raw distribution.
            "hot": (prompts[4], SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=2, temperature=0.7,
                                               seed=3))}
    with engine_for(hf_dir, backend) as engine:
        assert engine.continuous
        outs, done = run(engine, asks)
    assert all(o.logprobs is None for o in outs["none"]) and done["none"].logprobs is None
    assert "logprobs" not in done["none"].to_dict()
    for rid, k in (("k0", 0), ("k3", 3), ("k5", 5), ("hot", 2)):
        c = done[rid]
        per_step = [lp for o in outs[rid] for lp in o.logprobs]
        assert all(len(o.logprobs) == len(o.new_token_ids) == 1 for o in outs[rid])
        assert [lp.token_id for lp in per_step] == c.token_ids == [lp.token_id for lp in c.logprobs]
        assert per_step == c.logprobs
        check_against(hf_logprobs(hf_model, asks[rid][0], c.token_ids), c.logprobs, k)
        if rid != "hot":  # greedy: the sampled token is the best one
            assert all(lp.top[0] == (lp.token_id, lp.logprob) for lp in c.logprobs if k)
        d = json.loads(json.dumps(c.to_dict()))
        assert d["logprobs"][0] == {"token_id": c.token_ids[0], "logprob": c.logprobs[0].logprob,
                                    "top": [list(t) for t in c.logprobs[0].top]}


def test_generate_and_static_path_logprobs(hf_dir, hf_model):
    """Engine.generate (continuous) and generate_batch (static) give the same logprobs."""
    from mini_engine.sequence import Sequence

    params = SamplingParams(max_new_tokens=5, ignore_eos=True, logprobs=4)
    with engine_for(hf_dir, "torch") as engine:
        cont = engine.generate(["Hello world", "A"], params)
        seqs = [Sequence(i, c.prompt, c.prompt_token_ids) for i, c in enumerate(cont)]
        static = engine.generate_batch(seqs, params)
        plain = engine.generate_batch([Sequence(0, "A", cont[1].prompt_token_ids)],
                                      SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert plain[0].logprobs is None
    for c, s in zip(cont, static):
        assert s.token_ids == c.token_ids
        check_against(hf_logprobs(hf_model, c.prompt_token_ids, c.token_ids), s.logprobs, 4)
        for a, b in zip(c.logprobs, s.logprobs):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)


# ----- min_tokens ---------------------------------------------------------------------------------------
EOS_PROMPTS = [[464, 2068, 7586], [32, 33, 34, 35, 36], [15496, 995]]


@pytest.fixture(scope="module")
def eos_dir(tmp_path_factory):
    """A seeded tiny checkpoint whose EOS embedding is scaled up, so that greedy generation of two of
    EOS_PROMPTS ends on EOS at once (the third never does)."""
    from conftest import make_hf_checkpoint

    path = tmp_path_factory.mktemp("hf-eos")
    model = make_hf_checkpoint(path, seed=3)
    with torch.no_grad():
        model.transformer.wte.weight[EOS] *= 12.0  # tied: the lm_head's EOS row too
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def eos_model(eos_dir):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(eos_dir).eval()


def hf_generate(model, ids, n, min_new=0):
    t = torch.tensor([ids])
    out = model.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=n,
                         min_new_tokens=min_new, pad_token_id=EOS, eos_token_id=EOS)
    return out[0, t.shape[1]:].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_min_tokens_equals_transformers_min_new_tokens(eos_dir, eos_model, backend):
    from mini_engine.sequence import Sequence

    assert hf_generate(eos_model, EOS_PROMPTS[0], 12) == [EOS]  # the test means something
    cases = {f"{i}-{m}": (p, m) for i, p in enumerate(EOS_PROMPTS) for m in (0, 1, 4, 9)}
    with engine_for(eos_dir, backend) as engine:
        _, done = run(engine, {rid: (p, SamplingParams(max_new_tokens=12, min_tokens=m, logprobs=1))
                               for rid, (p, m) in cases.items()})
        static = {rid: engine.generate_batch([Sequence(0, "", p)], SamplingParams(max_new_tokens=12, min_tokens=m))[0]
                  for rid, (p, m) in cases.items()}
    for rid, (p, m) in cases.items():
        want = hf_generate(eos_model, p, 12, m)
        assert done[rid].token_ids == want, rid
        assert static[rid].token_ids == want, rid
        assert EOS not in want[:m]
        assert done[rid].finish_reason == ("stop" if want[-1] == EOS else "length")
        # Logprobs are of the raw logits: EOS, masked for the first m tokens, stays the best there.
        if m and p is not EOS_PROMPTS[2]:
            assert done[rid].logprobs[0].top[0][0] == EOS != done[rid].token_ids[0]


def test_min_tokens_sampled_rows_never_end_early(eos_dir):
    with engine_for(eos_dir, "torch") as engine:
        got = engine.generate([""] * 6, SamplingParams(max_new_tokens=8, min_tokens=5, temperature=1.0, seed=11))
        free = engine.generate([""] * 6, SamplingParams(max_new_tokens=8, temperature=1.0, seed=11))
    assert any(len(c.token_ids) < 5 for c in free)  # EOS comes early without min_tokens
    for c in got:
        assert len(c.token_ids) >= 5 and EOS not in c.token_ids[:5]


def expected_stop(tok, ids, stop, min_tokens):
    """vLLM's rule: a stop string counts once there are min_tokens tokens, found from the text of the
    first min_tokens - 1 tokens less len(stop) - 1 characters (what could begin one)."""
    start = max(0, len(tok.decode(ids[:max(min_tokens - 1, 0)])) - (len(stop) - 1)) if min_tokens > 1 else 0
    for n in range(max(min_tokens, 1), len(ids) + 1):
        i = tok.decode(ids[:n]).find(stop, start)
        if i >= 0:
            return ids[:n], tok.decode(ids[:n])[:i], "stop"
    return ids, tok.decode(ids), "length"


def test_stop_strings_wait_for_min_tokens(hf_dir):
    from mini_engine.sequence import Sequence

    with engine_for(hf_dir, "torch") as engine:
        tok = engine.tokenizer
        prompt = tok.encode("The quick brown fox")
        full = engine.generate_batch([Sequence(0, "", prompt)], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
        # The random model repeats itself: a stop string that appears early and then again.
        stop = tok.decode(full.token_ids[-1:])
        first = next(n for n in range(1, 13) if stop in tok.decode(full.token_ids[:n]))
        assert stop.strip() and first < 8 and full.text.count(stop) >= 3, full.text
        for m in (0, 1, first, first + 1, first + 3):
            params = SamplingParams(max_new_tokens=12, ignore_eos=True, stop=[stop], min_tokens=m)
            outs, done = run(engine, {"r": (prompt, params)})
            c = done["r"]
            ids, text, reason = expected_stop(tok, full.token_ids, stop, m)
            assert (c.token_ids, c.text, c.finish_reason) == (ids, text, reason), m
            assert "".join(o.text for o in outs["r"]) == c.text  # the stream sent only what the result has
            s = engine.generate_batch([Sequence(0, "", prompt)], params)[0]
            assert (s.token_ids, s.text, s.finish_reason) == (ids, text, reason), m
            assert reason == "stop" and len(ids) == max(first, m), m
