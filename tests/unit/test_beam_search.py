"""Beam search driver over a pure-Python toy distribution (the HF comparison is in tests/engine)."""

from __future__ import annotations

import math
import random

import pytest

from scheduler.beam_search import BeamSearchParams, beam_search
from scheduler.request import CompletionOutput, RequestOutput

V = 12
EOS = 0


def dist(history):
    rng = random.Random(hash(tuple(history)))
    w = [rng.random() ** 3 for _ in range(V)]
    z = sum(w)
    return [math.log(x / z) for x in w]


class Driver:
    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        self.batches.append(batch)
        outs = []
        for ids, sp in batch:
            assert sp.max_tokens == 1 and sp.temperature == 0
            lps = dist(ids)
            top = sorted(range(V), key=lambda t: -lps[t])[:sp.logprobs]
            c = CompletionOutput(0, "", [top[0]], lps[top[0]], [{t: lps[t] for t in top}], "length")
            outs.append(RequestOutput("x", None, ids, [c], True))
        return outs


def test_width_one_is_greedy():
    prompt = [3, 4, 5]
    out = beam_search(Driver(), [prompt], BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True), [EOS])
    seq = out[0].sequences[0]
    toks = []
    for _ in range(6):
        lps = dist(prompt + toks)
        toks.append(max(range(V), key=lambda t: lps[t]))
    assert seq.output_token_ids == toks and seq.tokens[:3] == prompt and seq.finish_reason == "length"
    assert seq.cum_logprob == pytest.approx(sum(seq.logprobs)) and seq.score == pytest.approx(seq.cum_logprob / 6)


def test_results_sorted_by_length_normalized_score_and_stop_at_eos():
    d = Driver()
    outs = beam_search(d, [[1], [2, 3], [7, 7, 7]], BeamSearchParams(beam_width=3, max_tokens=7), [EOS],
                       decode=lambda ids: ",".join(map(str, ids)))
    for o in outs:
        assert len(o.sequences) == 3
        scores = [s.score for s in o.sequences]
        assert scores == sorted(scores, reverse=True)
        for s in o.sequences:
            n = len(s.output_token_ids)
            assert 1 <= n <= 7 and s.score == pytest.approx(s.cum_logprob / n)
            assert (s.output_token_ids[-1] == EOS) == (s.finish_reason == "stop")
            assert EOS not in s.output_token_ids[:-1]
            assert s.text == ",".join(map(str, s.output_token_ids))
    # K = 2 * beam_width candidates per beam, one round per generated token
    assert all(sp.logprobs == 6 for b in d.batches for _, sp in b)
    assert len(d.batches) <= 7


def test_length_penalty_and_max_model_len():
    out = beam_search(Driver(), [[1, 2, 3]], BeamSearchParams(beam_width=2, max_tokens=50, length_penalty=0.0,
                                                              ignore_eos=True), [EOS], max_model_len=8)
    for s in out[0].sequences:
        assert len(s.tokens) <= 8 and s.score == pytest.approx(s.cum_logprob)


def test_params_validation():
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        BeamSearchParams(beam_width=2, max_tokens=3, temperature=0.5)
