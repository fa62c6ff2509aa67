"""SamplingParams validation and the batched sampler."""

import math

import pytest
import torch

from moela.engine.sampler import SamplingParams, apply_penalties, probabilities, sample, top_logprobs


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", 2.5), ("temperature", math.nan), ("temperature", math.inf), ("temperature", "hot"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("top_k", 1.5), ("min_p", -0.1), ("min_p", 1.1),
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 2.0), ("min_tokens", -1), ("min_tokens", 17),
    ("presence_penalty", 2.5), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("repetition_penalty", 3.0),
    ("n", 0), ("n", 129), ("logprobs", 21), ("logprobs", -1), ("prompt_logprobs", 21), ("seed", "abc"),
    ("stop", [""]), ("stop", ["x"] * 17), ("stop", [3]), ("stop_token_ids", [-1]),
])
def test_invalid_values_name_the_parameter(field, value):
    with pytest.raises(ValueError, match=f"^{field} = .* is invalid: must be"):
        SamplingParams(**{field: value})


def test_valid_edges():
    p = SamplingParams(temperature=0, top_p=1, top_k=0, min_p=1, max_tokens=None, stop="###", logprobs=20, n=128)
    assert p.greedy and p.top_k == -1 and p.stop == ["###"]


def test_greedy_top_k_top_p_min_p():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=2, seed=1), SamplingParams(top_p=0.5, seed=2),
              SamplingParams(min_p=0.5, seed=3)]
    for _ in range(20):
        tokens = sample(logits.clone(), params, [p.generator() for p in params])
        assert tokens[0] == 1 and tokens[1] in (1, 3) and tokens[2] == 1 and tokens[3] in (1, 3)


def test_seeded_rows_ignore_their_neighbours():
    logits = torch.randn(3, 50)
    p = SamplingParams(temperature=1.0, seed=42)
    alone = sample(logits[1:2].clone(), [p], [p.generator()])
    batch = sample(logits.clone(), [SamplingParams(seed=1), p, SamplingParams()], [None, p.generator(), None])
    assert alone[0] == batch[1]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3])
    p = SamplingParams(temperature=1.0, seed=0)
    g = p.generator()
    counts = torch.bincount(torch.stack([sample(probs.log()[None].clone(), [p], [g])[0] for _ in range(3000)]), minlength=3)
    assert torch.allclose(counts / 3000, probs, atol=0.03)


def test_probabilities_are_what_sample_draws_from():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 4)
    params = [SamplingParams(temperature=0), SamplingParams(top_k=2, temperature=0.5), SamplingParams(top_p=0.5),
              SamplingParams(min_p=0.1)]
    p = probabilities(logits, params)
    e = logits[0].exp()
    assert p[0].tolist() == [0, 1, 0, 0] and p[2].tolist() == [0, 1, 0, 0]
    assert torch.allclose(p[1], torch.tensor([0, e[1] ** 2, 0, e[3] ** 2]) / (e[1] ** 2 + e[3] ** 2))
    assert torch.allclose(p[3], torch.tensor([0, e[1], e[2], e[3]]) / (e[1] + e[2] + e[3]))  # token 0 is under 0.1 x the top one
    g = SamplingParams(seed=0).generator()
    draws = torch.stack([sample(logits[3:].clone(), params[3:], [g])[0] for _ in range(3000)])
    assert torch.allclose(torch.bincount(draws, minlength=4) / 3000, p[3], atol=0.03)


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.0]])
    out = apply_penalties(logits.clone(), [SamplingParams(repetition_penalty=2.0)], [([0, 1], [])])
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.0]]
    out = apply_penalties(logits.clone(), [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], [([], [2, 2, 3])])
    assert out.tolist() == [[2.0, -2.0, 0.0, -0.75]]


def test_top_logprobs():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    chosen, ids, lps = top_logprobs(logits, torch.tensor([0]), 2)
    ref = logits.log_softmax(-1)[0]
    assert ids.tolist() == [[2, 1]] and torch.allclose(lps[0], ref[[2, 1]]) and math.isclose(chosen[0], ref[0])
