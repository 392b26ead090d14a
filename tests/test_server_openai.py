"""The official openai client against the real server (uvicorn on 127.0.0.1)."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from server_util import running_server, wait_idle

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(hf_dir):
    with running_server(str(hf_dir)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def hf_greedy(hf_model, prompt_ids, n):
    import torch

    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                                pad_token_id=50256, eos_token_id=None)
    return out[0, len(prompt_ids):].tolist()


def test_models(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.model_name]


def test_completion_matches_transformers(client, server, hf_model):
    tok = server.engine.tokenizer
    prompt = "The quick brown fox"
    r = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    want = hf_greedy(hf_model, tok.encode(prompt), 12)
    assert r.choices[0].text == tok.decode(want)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.object == "text_completion" and r.id.startswith("cmpl-")


def test_streaming_matches_batch(client, server):
    kw = dict(model=server.model_name, prompt="Once upon a time", max_tokens=10, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole
    assert len(text_chunks) == 10  # one event per token (every piece of this text is a whole character)
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == 10


def test_several_prompts_and_token_ids(client, server):
    tok = server.engine.tokenizer
    prompts = ["Hello there", "A much longer prompt than the first one, to mix lengths"]
    r = client.completions.create(model=server.model_name, prompt=prompts, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    alone = [client.completions.create(model=server.model_name, prompt=p, max_tokens=5, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    assert [c.text for c in r.choices] == alone
    ids = client.completions.create(model=server.model_name, prompt=tok.encode(prompts[0]), max_tokens=5,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert ids.choices[0].text == alone[0]


def test_echo_and_stop(client, server):
    kw = dict(model=server.model_name, prompt="Echo me", max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0].text
    echoed = client.completions.create(echo=True, **kw).choices[0].text
    assert echoed == "Echo me" + plain
    stop = plain[3:6]
    if stop.strip():
        r = client.completions.create(stop=[stop], **kw).choices[0]
        assert r.finish_reason == "stop" and stop not in r.text and plain.startswith(r.text)


def test_seeded_sampling_is_reproducible(client, server):
    kw = dict(model=server.model_name, prompt="Random", max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_logprobs(client, server, hf_model):
    import torch

    tok = server.engine.tokenizer
    prompt = "Logprobs of"
    r = client.completions.create(model=server.model_name, prompt=prompt, max_tokens=4, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True}).choices[0]
    lp = r.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.text
    ids = tok.encode(prompt)
    with torch.no_grad():
        for i in range(4):
            logits = hf_model(torch.tensor([ids])).logits[0, -1].double()
            ref = torch.log_softmax(logits, -1)
            nxt = int(ref.argmax())
            assert lp.token_logprobs[i] == pytest.approx(float(ref[nxt]), abs=1e-4)
            top = torch.topk(ref, 3)
            got = lp.top_logprobs[i]
            assert len(got) == 3
            assert sorted(got.values(), reverse=True) == pytest.approx(top.values.tolist(), abs=1e-4)
            ids.append(nxt)
    assert lp.text_offset[0] == 0 and np.all(np.diff(lp.text_offset) >= 0)
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=server.model_name, prompt=prompt, max_tokens=4, temperature=0, logprobs=3, stream=True,
        extra_body={"ignore_eos": True})]
    assert [t for s in streamed for t in s.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_errors_raise_in_the_client(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model_name, prompt="x", max_tokens=16, n=2)
    assert "n must be 1" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.model_name, prompt="x", max_tokens=10**6)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model_name, messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in e.value.message
    wait_idle(server.url)
    assert httpx.get(f"{server.url}/health").status_code == 200
