"""The sampler: greedy, filters, penalties, seeds independent of the batch, raw logprobs."""

from __future__ import annotations

import torch

from scheduler.wire import SeqSampling
from sharding.sampler import Sampler, SamplerInput

V = 50


def _logits(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, V, generator=torch.Generator().manual_seed(seed)) * 3


def _run(logits, params, histories=None, num_prompt=None, seed=0):
    histories = histories or [[1, 2, 3] for _ in params]
    num_prompt = num_prompt or [3 for _ in params]
    return Sampler(torch.device("cpu"), seed)(logits, SamplerInput(params, histories, num_prompt))


def test_greedy_picks_argmax_and_reports_raw_logprob():
    logits = _logits(4)
    out = _run(logits, [SeqSampling(temperature=0.0)] * 4)
    assert out.token_ids == logits.argmax(-1).tolist()
    expected = torch.log_softmax(logits, -1).max(-1).values.tolist()
    assert all(abs(a - b) < 1e-6 for a, b in zip(out.logprobs, expected))


def test_top_k_one_is_greedy_even_at_high_temperature():
    logits = _logits(8, seed=1)
    out = _run(logits, [SeqSampling(temperature=5.0, top_k=1)] * 8)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_p_keeps_only_the_nucleus():
    logits = torch.full((1, V), -10.0)
    logits[0, 7], logits[0, 9] = 5.0, 4.9        # ~two thirds of the mass each side of 0.5
    params = [SeqSampling(temperature=1.0, top_p=0.5, seed=s) for s in range(40)]
    tokens = {t for s in range(40) for t in _run(logits, [params[s]]).token_ids}
    assert tokens == {7}


def test_min_p_drops_unlikely_tokens():
    logits = torch.zeros(1, V)
    logits[0, 3] = 10.0
    tokens = {_run(logits, [SeqSampling(temperature=1.0, min_p=0.01, seed=s)]).token_ids[0] for s in range(30)}
    assert tokens == {3}


def test_seeded_request_gives_same_tokens_alone_and_in_a_batch():
    logits = _logits(6, seed=2)
    seeded = SeqSampling(temperature=1.0, seed=1234)
    alone = _run(logits[2:3], [seeded], histories=[[1, 2, 3, 4]], num_prompt=[2])
    others = [SeqSampling(temperature=1.0)] * 6
    others[2] = seeded
    hist = [[9, 9, 9, 9, 9, 9]] * 6
    hist[2] = [1, 2, 3, 4]
    batched = _run(logits, others, histories=hist, num_prompt=[2] * 6, seed=99)
    assert batched.token_ids[2] == alone.token_ids[0]


def test_different_output_positions_of_a_seed_draw_different_noise():
    logits = torch.zeros(1, V)   # uniform: the token is decided by the noise alone
    draws = {_run(logits, [SeqSampling(temperature=1.0, seed=7)], histories=[[1] * (3 + k)]).token_ids[0]
             for k in range(20)}
    assert len(draws) > 5


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 6] = 2.0, 1.9
    out = _run(logits, [SeqSampling(temperature=0.0, repetition_penalty=1.5)], histories=[[5]], num_prompt=[1])
    assert out.token_ids == [6]


def test_frequency_penalty_counts_only_outputs():
    logits = torch.zeros(1, V)
    logits[0, 5], logits[0, 6] = 2.0, 1.5
    # 5 appears in the prompt only: no frequency penalty
    assert _run(logits, [SeqSampling(temperature=0.0, frequency_penalty=1.0)], histories=[[5, 5]],
                num_prompt=[2]).token_ids == [5]
    # 5 appears once as an output: 2.0 - 1.0 < 1.5
    assert _run(logits, [SeqSampling(temperature=0.0, frequency_penalty=1.0)], histories=[[1, 5]],
                num_prompt=[1]).token_ids == [6]


def test_min_tokens_suppresses_eos_until_reached():
    logits = torch.zeros(1, V)
    logits[0, 0] = 10.0    # eos
    p = SeqSampling(temperature=0.0, min_tokens=2, suppress_token_ids=[0])
    assert _run(logits, [p], histories=[[1, 2, 9]], num_prompt=[2]).token_ids != [0]
    assert _run(logits, [p], histories=[[1, 2, 9, 9]], num_prompt=[2]).token_ids == [0]


def test_top_logprobs_are_sorted_and_raw():
    logits = _logits(2, seed=3)
    out = _run(logits, [SeqSampling(temperature=0.0, logprobs=3), SeqSampling(temperature=0.0)])
    ref = torch.log_softmax(logits[0], -1).topk(3)
    assert [t for t, _ in out.top_logprobs[0]] == ref.indices.tolist()
    assert out.top_logprobs[1] is None
