import numpy as np
import pytest

from mini_engine.errors import ConfigError
from mini_engine.sampling import Sampler, SamplingParams


def test_greedy_is_argmax():
    logits = np.array([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]], np.float32)
    assert Sampler(SamplingParams(), [None, None])(logits, [0, 1]).tolist() == [1, 0]


def test_top_k_and_top_p_restrict_support():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    k1 = Sampler(SamplingParams(temperature=1.0, top_k=1), [0])
    assert {int(k1(logits, [0])[0]) for _ in range(50)} == {0}
    p = Sampler(SamplingParams(temperature=1.0, top_p=0.7), [0])
    assert {int(p(logits, [0])[0]) for _ in range(200)} == {0, 1}


def test_seeded_rows_are_reproducible():
    logits = np.zeros((2, 1000), np.float32)
    a = Sampler(SamplingParams(temperature=1.0), [1, 2])
    b = Sampler(SamplingParams(temperature=1.0), [1, 2])
    assert [a(logits, [0, 1]).tolist() for _ in range(5)] == [b(logits, [0, 1]).tolist() for _ in range(5)]


@pytest.mark.parametrize("kw", [{"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_k": -2},
                                {"stop": [""]}])
def test_invalid_params(kw):
    with pytest.raises(ConfigError):
        SamplingParams(**kw)
