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
