"""Traffic the server must survive: many concurrent clients, clients that leave, a full queue,
timeouts, malformed bodies, API keys. A real uvicorn server on 127.0.0.1, real HTTP clients."""
from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest

from server_util import running_server, wait_idle


def sse_events(lines):
    for line in lines:
        if line.startswith("data: "):
            data = line[6:]
            if data == "[DONE]":
                return
            yield json.loads(data)


@pytest.fixture(scope="module")
def server(hf_dir):
    with running_server(str(hf_dir), overrides={"scheduler.max_num_seqs": 16}) as s:
        yield s


def test_64_concurrent_mixed_clients_no_cross_talk(server, hf_model):
    import torch

    tok = server.engine.tokenizer
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    jobs = []
    for i in range(64):
        prompt = f"{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
        jobs.append((prompt, rng.randint(1, 24), i % 2 == 0, i % 3 == 0))  # prompt, max_tokens, stream, native

    async def one(client, prompt, n, stream, native):
        if native:
            path, body = "/generate", {"prompt": prompt, "max_new_tokens": n, "ignore_eos": True}
            if stream:
                path = "/generate/stream"
        else:
            path = "/v1/completions"
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": stream}
        if not stream:
            r = await client.post(path, json=body)
            assert r.status_code == 200, r.text
            d = r.json()
            return d["text"] if native else d["choices"][0]["text"]
        async with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            lines = [line async for line in r.aiter_lines()]
        events = list(sse_events(lines))
        if native:
            assert events[-1]["finished"] and events[-1]["usage"]["completion_tokens"] == n
            return "".join(e["text"] for e in events)
        return "".join(e["choices"][0]["text"] for e in events)

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, *j) for j in jobs))

    texts = asyncio.run(main())
    with torch.no_grad():
        for (prompt, n, _, _), text in zip(jobs, texts):
            ids = tok.encode(prompt)
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=50256,
                                    eos_token_id=None)
            assert text == tok.decode(out[0, len(ids):].tolist()), prompt
    wait_idle(server.url)
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.fixture(scope="module")
def slow():
    """GPT-2 small's shape (seeded random weights): tens of ms per token here, so a request can
    still be running when the test acts. At most 2 admitted requests, 1 s timeout."""
    with running_server("random:gpt2", overrides={"server.max_concurrent_requests": 2,
                                                  "server.request_timeout_s": 1.0}) as s:
        httpx.post(f"{s.url}/v1/completions", json={"prompt": "warm", "max_tokens": 2})  # kernels compiled
        yield s


def aborted(s) -> float:
    return s.state.metrics._errors.labels(model_name=s.model_name, status="499")._value.get()


def test_client_that_leaves_mid_stream_frees_its_kv(slow):
    before = aborted(slow)
    body = {"prompt": "leave early", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=slow.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                    if got == 3:
                        break  # the client goes away after three tokens
    stats = wait_idle(slow.url)
    assert stats["kv_usage"] == 0 and aborted(slow) == before + 1
    # A batch client that leaves is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow.url}/v1/completions", timeout=0.3,
                   json={"prompt": "gone", "max_tokens": 200, "ignore_eos": True, "temperature": 0})
    wait_idle(slow.url)
    assert aborted(slow) == before + 2
    r = httpx.post(f"{slow.url}/v1/completions", json={"prompt": "still serving", "max_tokens": 3})
    assert r.status_code == 200


def test_full_queue_is_refused_at_once(slow):
    body = {"prompt": "long", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=slow.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as a, c.stream("POST", "/v1/completions", json=body) as b:
            assert a.status_code == b.status_code == 200
            r = httpx.post(f"{slow.url}/v1/completions", json={"prompt": "third", "max_tokens": 2}, timeout=5)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            r = httpx.post(f"{slow.url}/generate", json={"prompt": "third"}, timeout=5)
            assert r.status_code == 429
    wait_idle(slow.url)
    assert httpx.post(f"{slow.url}/v1/completions", json={"prompt": "now", "max_tokens": 2}).status_code == 200


def test_timeout_is_504_and_stops_the_work(slow):
    body = {"prompt": "slow", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    r = httpx.post(f"{slow.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    wait_idle(slow.url, timeout=2)  # aborted, not still computing
    r = httpx.post(f"{slow.url}/generate", json={"prompt": "slow", "max_new_tokens": 400, "ignore_eos": True})
    assert r.status_code == 504
    with httpx.stream("POST", f"{slow.url}/v1/completions", json=body | {"stream": True}, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "timeout" and len(events) > 1
    assert wait_idle(slow.url, timeout=2)["kv_usage"] == 0


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"prompt": 5}', 400, "prompt"),
    (b'{"prompt": "x", "max_tokens": "ten"}', 400, "max_tokens"),
    (b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
    (b'{"prompt": "x", "temperature": 3}', 400, "temperature"),
    (b'{"prompt": "x", "top_p": 0}', 400, "top_p"),
    (b'{"prompt": "x", "logprobs": 6}', 400, "logprobs"),
    (b'{"prompt": "x", "frobnicate": 1}', 400, "frobnicate"),
    (b'{"prompt": []}', 400, "prompt"),
    (b'{"prompt": [[]]}', 400, "prompt"),
    (b'{"prompt": [99999999]}', 400, None),
    (b'{"prompt": "x", "max_tokens": 100000000}', 400, "prompt"),
    (b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
    (b'{"prompt": "x", "n": 3}', 400, "n"),
    (b'{"prompt": "x", "stream_options": {"include_usage": true}}', 400, "stream_options"),
    (b'{"prompt": "\xff\xfe bad utf-8"}', 400, None),
    (b'{"prompt": "x", "model": "other"}', 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD, ids=[b[0][:30].decode("latin-1") for b in BAD])
def test_bad_bodies_get_an_openai_error(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in r.text
    if param is not None:
        assert err["param"] == param, err


def test_oversized_and_odd_requests(hf_dir):
    with running_server(str(hf_dir), overrides={"server.max_body_bytes": 1000}) as s:
        big = json.dumps({"prompt": "x" * 2000}).encode()
        r = httpx.post(f"{s.url}/v1/completions", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["message"].startswith("request body is larger")

        def chunks():  # no Content-Length: the limit is counted while reading
            for _ in range(10):
                yield b" " * 300
        r = httpx.post(f"{s.url}/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert httpx.get(f"{s.url}/no/such/route").status_code == 404
        assert httpx.get(f"{s.url}/v1/completions").status_code == 405
        r = httpx.post(f"{s.url}/v1/chat/completions", json={"messages": []})
        assert r.status_code == 400 and r.json()["error"]["code"] == "chat_not_supported"
        assert httpx.post(f"{s.url}/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_api_key(hf_dir):
    with running_server(str(hf_dir), overrides={"server.api_key": "s3cret"}) as s:
        assert httpx.get(f"{s.url}/health").status_code == 200  # probes need no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(f"{s.url}/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(f"{s.url}/metrics", headers=headers).status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{s.url}/v1/models", headers=ok).status_code == 200
        openai = pytest.importorskip("openai")
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="s3cret", max_retries=0)
        assert client.completions.create(model=s.model_name, prompt="hi", max_tokens=2).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="nope", max_retries=0).models.list()


def test_loopback_rule():
    from mini_engine.server.server_config import ServerConfig

    assert ServerConfig(host="127.0.0.1").loopback and ServerConfig(host="::1").loopback
    assert ServerConfig(host="localhost").loopback
    assert not ServerConfig(host="0.0.0.0").loopback and not ServerConfig(host="10.1.2.3").loopback


def test_exposed_without_a_key_warns():
    from mini_engine.server.launcher import exposure_warning
    from mini_engine.server.server_config import ServerConfig

    assert "no API key" in exposure_warning(ServerConfig(host="0.0.0.0"))
    assert exposure_warning(ServerConfig(host="0.0.0.0", api_key="k")) is None
    assert exposure_warning(ServerConfig(host="127.0.0.1")) is None


def test_connections_have_nagle_off(server):
    import socket

    sock = server._socket
    assert sock.proto == socket.IPPROTO_TCP  # asyncio then sets TCP_NODELAY on every accepted connection
