"""The async front: many concurrent submitters, one engine loop, ordered per-request streams."""
import asyncio
import threading

import numpy as np
import pytest

from mini_engine.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(hf_dir):
    from mini_engine import Engine

    with Engine(model=str(hf_dir)) as e:
        yield e


def test_64_concurrent_async_submitters_get_their_own_streams(engine):
    from mini_engine.async_engine import AsyncEngine

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50000, int(rng.integers(2, 30))).tolist() for _ in range(64)]
    lengths = [int(rng.integers(1, 12)) for _ in range(64)]
    expected = [engine.generate(engine.tokenizer.decode(p), max_new_tokens=1)[0] for p in prompts[:1]]  # warm
    del expected
    alone = []
    for p, n in zip(prompts, lengths):
        engine.add_request("ref", p, SamplingParams(max_new_tokens=n, ignore_eos=True))
        out = []
        while engine.has_unfinished_requests():
            out += [o for o in engine.step()]
        alone.append(out[-1].completion.token_ids)

    async def client(front, i):
        await asyncio.sleep(0.001 * (i % 7))  # staggered arrivals
        stream = front.submit(prompts[i], SamplingParams(max_new_tokens=lengths[i], ignore_eos=True))
        tokens, texts, last = [], [], None
        async for out in stream:
            assert out.request_id == stream.request_id
            tokens += out.new_token_ids
            texts.append(out.text)
            last = out
        assert last.finished and last.completion.token_ids == tokens
        assert "".join(texts) == last.completion.text
        return tokens

    async def main(front):
        return await asyncio.gather(*(client(front, i) for i in range(64)))

    with AsyncEngine(engine) as front:
        got = asyncio.run(main(front))
        assert front.stats()["kv_usage"] == 0
    assert got == alone


def test_client_that_goes_away_aborts_and_frees_blocks(engine):
    from mini_engine.async_engine import AsyncEngine

    async def main(front):
        stream = front.submit([5, 6, 7] * 10, SamplingParams(max_new_tokens=80, ignore_eos=True))
        async for out in stream:
            break  # the client leaves after the first token
        await asyncio.sleep(0.2)

    with AsyncEngine(engine) as front:
        asyncio.run(main(front))
        for _ in range(100):
            if not engine.has_unfinished_requests():
                break
            threading.Event().wait(0.02)
        assert not engine.has_unfinished_requests() and front.stats()["kv_usage"] == 0


def test_blocking_streams_from_threads(engine):
    from mini_engine.async_engine import AsyncEngine

    results = {}
    with AsyncEngine(engine) as front:
        def worker(i):
            results[i] = front.generate([100 + i, 200, 300], SamplingParams(max_new_tokens=5, ignore_eos=True))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(results) == list(range(8)) and all(len(c.token_ids) == 5 for c in results.values())


def test_bad_prompt_fails_in_the_caller(engine):
    from mini_engine.async_engine import AsyncEngine
    from mini_engine.errors import ConfigError, PromptTooLong

    with AsyncEngine(engine) as front:
        with pytest.raises(ConfigError):
            front.submit([-1, 3])
        with pytest.raises(PromptTooLong):
            front.submit(list(range(200)), SamplingParams(max_new_tokens=4))


def test_close_ends_streams_still_in_the_inbox(engine):
    from mini_engine.async_engine import AsyncEngine

    front = AsyncEngine(engine)
    streams = [front.submit([1, 2, 3], SamplingParams(max_new_tokens=50, ignore_eos=True)) for _ in range(4)]
    front.close()
    done = threading.Event()

    def drain():
        for s in streams:
            list(s)  # ends (unfinished) instead of blocking forever
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    assert done.wait(10)
    assert not engine.has_unfinished_requests()
    with pytest.raises(Exception, match="closed"):
        front.submit([1, 2])


def test_a_cancelled_future_aborts_its_request_and_the_loop_goes_on(engine):
    from mini_engine.serving import BatchedEngine

    params = engine.sampling_params(max_new_tokens=30, ignore_eos=True)
    with BatchedEngine(engine, "generate", params=params) as server:
        doomed = server.submit([7, 8, 9])
        doomed.cancel()
        ok = server.submit([4, 5, 6]).result(60)
        assert len(ok.token_ids) == 30 and server.front.is_alive


def test_generate_keeps_other_requests_outputs(engine):
    engine.add_request("mine", [11, 12, 13], SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.generate("Hello", max_new_tokens=12, ignore_eos=True)
    outs = []
    while engine.has_unfinished_requests() or not outs:
        outs += engine.step()
    got = [o for o in outs if o.request_id == "mine"]
    assert sum(len(o.new_token_ids) for o in got) == 6 and got[-1].finished


def test_continuous_batched_engine_honours_timeouts(engine):
    from mini_engine.batcher import RequestTimeout
    from mini_engine.serving import BatchedEngine

    params = engine.sampling_params(max_new_tokens=100, ignore_eos=True)
    with BatchedEngine(engine, "generate", params=params) as server:
        slow = server.submit([3, 4, 5], timeout_ms=5)
        with pytest.raises(RequestTimeout):
            slow.result(30)
        quick = server.submit([3, 4, 5], max_new_tokens=3, timeout_ms=30_000).result(30)
        assert len(quick.token_ids) == 3
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        threading.Event().wait(0.02)
    assert engine.stats()["kv_usage"] == 0
