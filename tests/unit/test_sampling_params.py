"""SamplingParams: vLLM defaults, every validation error, and the wire form."""

import pytest

from scheduler.sampling_params import SamplingParams, SamplingParamsError


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens, p.min_tokens) == (1, 1.0, 1.0, 0, 0.0, 16, 0)
    assert p.stop_strings == [] and p.stop_token_ids == [] and p.logprobs is None
    assert p.skip_special_tokens and not p.ignore_eos and not p.include_stop_str_in_output


@pytest.mark.parametrize("kwargs, field, allowed", [
    ({"n": 0}, "n", ">= 1"),
    ({"n": 1.5}, "n", "integer"),
    ({"temperature": -0.1}, "temperature", ">= 0"),
    ({"temperature": float("nan")}, "temperature", ">= 0"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": 1.01}, "top_p", "(0, 1]"),
    ({"top_k": -2}, "top_k", "-1 or 0"),
    ({"top_k": 2.0}, "top_k", "integer"),
    ({"min_p": -0.01}, "min_p", "[0, 1]"),
    ({"min_p": 1.5}, "min_p", "[0, 1]"),
    ({"max_tokens": 0}, "max_tokens", "in [1, "),
    ({"min_tokens": -1}, "min_tokens", "in [0, "),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens", "max_tokens=4"),
    ({"stop": ""}, "stop", "non-empty"),
    ({"stop": ["ok", ""]}, "stop", "non-empty"),
    ({"stop": [3]}, "stop", "non-empty str"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", ">= 0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
    ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": -2.01}, "frequency_penalty", "[-2, 2]"),
    ({"logprobs": -1}, "logprobs", ">= 0"),
    ({"seed": "7"}, "seed", "integer"),
    ({"temperature": True}, "temperature", "number"),
])
def test_each_invalid_value_names_field_value_and_range(kwargs, field, allowed):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    msg = str(e.value)
    assert field in msg and allowed in msg
    bad = kwargs[field] if field in kwargs else None
    if isinstance(bad, (int, float)) and bad == bad:
        assert repr(bad) in msg or str(bad) in msg
    assert isinstance(e.value, ValueError)


def test_valid_edges_accepted():
    p = SamplingParams(temperature=0, top_p=1.0, top_k=-1, min_p=1.0, max_tokens=None, min_tokens=3,
                       presence_penalty=-2, frequency_penalty=2, logprobs=0, seed=-5, stop="x")
    assert (p.temperature, p.top_k, p.max_tokens, p.logprobs, p.seed, p.stop_strings) == (0, -1, None, 0, -5, ["x"])
    assert p.greedy
    # the 64-bit seed edges: seed + i of the last output still fits
    top = SamplingParams(seed=2**63 - 3, n=3)
    assert top.to_wire([0], 2).seed == 2**63 - 1
    assert SamplingParams(seed=-(2**63)).to_wire([0]).seed == -(2**63)


def test_stop_normalized_to_list():
    assert SamplingParams(stop="END").stop_strings == ["END"]
    assert SamplingParams(stop=("a", "b")).stop_strings == ["a", "b"]
    assert SamplingParams(stop_token_ids=(5, 6)).stop_token_ids == [5, 6]


def test_wire_greedy_disables_filters_and_top_k_zero_means_minus_one():
    w = SamplingParams(temperature=0, top_p=0.5, top_k=5, min_p=0.3).to_wire([2])
    assert (w.temperature, w.top_p, w.top_k, w.min_p) == (0.0, 1.0, -1, 0.0)
    assert SamplingParams(temperature=0.7, top_k=0).to_wire([2]).top_k == -1
    assert SamplingParams(temperature=0.7, top_k=7).to_wire([2]).top_k == 7


def test_wire_seed_offset_per_output_index():
    p = SamplingParams(seed=10, n=3, temperature=1.0)
    assert [p.to_wire([0], i).seed for i in range(3)] == [10, 11, 12]
    assert SamplingParams().to_wire([0], 2).seed is None


def test_wire_suppression_only_while_min_tokens_matters():
    assert SamplingParams().to_wire([2]).suppress_token_ids == []
    w = SamplingParams(min_tokens=3, stop_token_ids=[7, 2]).to_wire([2, 9])
    assert w.min_tokens == 3 and w.suppress_token_ids == [7, 2, 9]
    # ignore_eos: EOS does not stop the sequence, so nothing protects it; stop tokens still do
    w = SamplingParams(min_tokens=3, stop_token_ids=[7], ignore_eos=True).to_wire([2])
    assert w.suppress_token_ids == [7]
