"""The sampler: greedy (on the logits' device), the repetition penalty, top-k, seeds, bad parameters."""

from __future__ import annotations

import pytest
import torch

from swarm.client.sampling import Sampler, SamplingParams
from swarm.errors import SwarmError


def _logits(seed: int = 0, n: int = 1000) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_the_first_largest_logit():
    logits = _logits()
    want = int(torch.argmax(logits))
    assert Sampler(SamplingParams())(logits, []) == want
    assert Sampler(SamplingParams())(logits.to(torch.bfloat16), [1, 2]) == int(torch.argmax(logits.bfloat16()))
    tied = torch.zeros(10)
    tied[[3, 7]] = 1.0
    assert Sampler(SamplingParams())(tied, []) == 3


def test_greedy_with_a_repetition_penalty_demotes_tokens_seen():
    logits = torch.full((6,), -1.0)
    logits[2], logits[4] = 5.0, 4.5
    p = SamplingParams(repetition_penalty=2.0)
    assert Sampler(p)(logits, []) == 2  # nothing seen yet
    assert Sampler(p)(logits, [2]) == 4  # 5.0 / 2 < 4.5
    assert Sampler(SamplingParams())(logits, [2]) == 2  # no penalty: history does not matter


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    logits = _logits(1)
    p = SamplingParams(temperature=0.9, top_k=50, seed=5)
    a = [Sampler(p)(logits, []) for _ in range(3)]
    s1, s2 = Sampler(p), Sampler(p)
    assert [s1(logits, []) for _ in range(20)] == [s2(logits, []) for _ in range(20)]
    assert a[0] == a[1] == a[2]  # each sampler starts from the seed
    assert all(torch.topk(logits, 50).indices.eq(s1(logits, [])).any() for _ in range(20))
    assert Sampler(SamplingParams(temperature=1.5, top_k=1, seed=1))(logits, []) == int(torch.argmax(logits))


@pytest.mark.parametrize("kw,what", [(dict(temperature=-0.1), "temperature"), (dict(top_k=0), "top_k"),
                                     (dict(top_p=1.5), "top_p"), (dict(repetition_penalty=0), "repetition_penalty")])
def test_bad_parameters_are_named(kw, what):
    with pytest.raises(SwarmError, match=what):
        Sampler(SamplingParams(**kw))
