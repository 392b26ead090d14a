"""Generation through the real CLI and the Python API, against transformers.generate."""
import json

import pytest
import torch

from conftest import run_cli

PROMPTS = ["Hello world", "The quick brown fox jumps over", "A"]


def hf_greedy(hf_model, prompt_ids, n):
    ids = torch.tensor([prompt_ids])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                            min_new_tokens=n, pad_token_id=50256)
    return out[0, ids.shape[1]:].tolist()


def test_cli_greedy_equals_transformers(hf_dir, hf_model):
    proc = run_cli("generate", "--model", hf_dir, "--json", "-n", 24, "--ignore-eos", *PROMPTS, check=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        assert set(r) >= {"prompt", "text", "token_ids", "finish_reason", "ttft_ms", "total_ms", "tokens_per_s"}
        assert r["token_ids"] == hf_greedy(hf_model, r["prompt_token_ids"], 24)
        assert r["finish_reason"] == "length"


def test_batched_left_padded_equals_one_at_a_time(hf_dir):
    from mini_engine import Engine

    with Engine(model=str(hf_dir)) as engine:
        batched = engine.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
        alone = [engine.generate(p, max_new_tokens=12, ignore_eos=True)[0] for p in PROMPTS]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert all(len(c.token_ids) == 12 for c in batched)


def test_sampling_is_seeded_and_stop_strings_cut(hf_dir):
    from mini_engine import Engine

    with Engine(model=str(hf_dir)) as engine:
        a = engine.generate("Hello", max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=3)
        b = engine.generate("Hello", max_new_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=3)
        assert a[0].token_ids == b[0].token_ids
        greedy = engine.generate("Hello", max_new_tokens=10, ignore_eos=True)[0]
        stop = greedy.text[len(greedy.text) // 2:][:3]
        cut = engine.generate("Hello", max_new_tokens=10, stop=[stop], ignore_eos=True)[0]
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert greedy.text.startswith(cut.text)


def test_eos_stops_generation(hf_dir):
    from mini_engine import Engine

    with Engine(model=str(hf_dir)) as engine:
        ids = engine.generate("Hello", max_new_tokens=10, ignore_eos=True)[0].token_ids
        k = next(i for i, t in enumerate(ids) if t not in ids[:i] and i > 0)
        engine.tokenizer.eos_token_id = ids[k]  # pretend that token is <|endoftext|>
        c = engine.generate("Hello", max_new_tokens=10)[0]
    assert c.finish_reason == "stop" and c.token_ids == ids[:k + 1]


def test_context_window(hf_dir):
    from mini_engine import Engine
    from mini_engine.errors import PromptTooLong

    long_prompt = "hello " * 200  # the test checkpoint has 128 positions
    with Engine(model=str(hf_dir)) as engine:
        with pytest.raises(PromptTooLong, match="context window"):
            engine.generate(long_prompt, max_new_tokens=4)
        # Truncation cuts the prompt, never the generation: every requested token comes.
        c = engine.generate(long_prompt, max_new_tokens=4, truncate=True, ignore_eos=True)[0]
        assert len(c.prompt_token_ids) == 124 and c.finish_reason == "length" and len(c.token_ids) == 4
        assert c.prompt_token_ids == engine.tokenizer.encode(long_prompt)[-124:]
        # A prompt that fits together with max_new_tokens is untouched, even exactly at the window.
        fits = engine.generate("hello " * 59, max_new_tokens=128 - 60, ignore_eos=True)[0]
        assert len(fits.prompt_token_ids) == 60 and len(fits.token_ids) == 68
        with pytest.raises(PromptTooLong, match="no room for a prompt"):
            engine.generate("hello", max_new_tokens=128, truncate=True)
        # Scoring generates nothing, so only one position is reserved.
        assert len(engine.score("hello " * 126)[0].prompt_token_ids) == 127


def test_cli_prompt_beyond_context_window_is_one_line_unless_truncated():
    prompt = "hello " * 250  # 251 tokens; random:tiny has 256 positions
    proc = run_cli("generate", "-m", "random:tiny", "-n", 8, prompt)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("Error")]
    assert "prompt (251 tokens) + max_new_tokens (8) = 259 tokens" in line and "--truncate" in line
    proc = run_cli("generate", "-m", "random:tiny", "-n", 8, "--truncate", "--ignore-eos", "--json", prompt,
                   check=True)
    out = json.loads(proc.stdout)
    assert len(out["prompt_token_ids"]) == 248 and len(out["token_ids"]) == 8


def test_tensorrt_on_a_machine_without_it_gives_both_reasons():
    from mini_engine.registry import get_backend

    avail = get_backend("tensorrt").availability()
    proc = run_cli("generate", "-m", "random:tiny", "--backend", "tensorrt", "x")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "does not support device 'cpu' (supported: cuda)" in proc.stderr
    if not avail.available:  # e.g. "TensorRT is not installed (...); no CUDA device (...)"
        assert f"nor can it run on this machine: {avail.reason}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_json_timings_say_whether_they_are_per_request_or_per_batch(tmp_path):
    from mini_engine import Engine

    batch_keys = {"batch_ttft_ms", "batch_total_ms", "batch_tokens_per_s", "batch_tpot_ms"}
    request_keys = {"ttft_ms", "total_ms", "tokens_per_s", "tpot_ms", "queue_ms"}
    for backend in ("torch", "onnxruntime"):
        proc = run_cli("generate", "-m", "random:tiny", "-b", backend, "-n", 2, "--json", "Hi", check=True,
                       env={"MINI_ENGINE_CACHE": str(tmp_path)})
        keys = set(json.loads(proc.stdout))
        with Engine(model="random:tiny", backend=backend, **({"cache_dir": str(tmp_path)}
                                                              if backend == "onnxruntime" else {})) as engine:
            continuous = engine.continuous
        assert request_keys <= keys and not batch_keys & keys if continuous else \
            batch_keys <= keys and not request_keys & keys, (backend, keys)


def test_max_new_tokens_help_says_what_and_the_default():
    out = run_cli("generate", "--help", check=True).stdout
    assert "Tokens to generate per prompt" in out and "generation.max_new_tokens, 32" in out


def test_random_gpt2_generates_text():
    proc = run_cli("generate", "--model", "random:gpt2", "-n", 4, "Hello", check=True)
    assert proc.stdout.startswith("Hello") and len(proc.stdout) > len("Hello\n")
    assert "meaningless" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--backend", "nope", "x"], "unknown backend 'nope'"),
    (["--backend", "tensorrt", "--device", "cuda", "x"], "unavailable"),
    (["--backend", "tensorrt", "x"], "does not support device 'cpu'"),
    (["--model", "/does/not/exist", "x"], "does not exist"),
    (["--model", "random:gpt5", "x"], "unknown random model"),
    (["--model", "some-org/not-cached-model", "x"], "not in the Hugging Face cache"),
    (["--max-new-tokens", "0", "x"], "0"),
    (["--set", "batching.max_batch_size=zero", "x"], "batching.max_batch_size"),
    (["--set", "model.colour=blue", "x"], "unknown config key 'model.colour'"),
    (["--config", "/nope.toml", "x"], "does not exist"),
    (["--device", "tpu", "x"], "does not support device 'tpu'"),
    ([], "Missing argument"),
])
def test_cli_errors_are_one_line(args, message, tmp_path):
    proc = run_cli("generate", "-m", "random:tiny", *args, env={"HF_HOME": str(tmp_path)})
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
