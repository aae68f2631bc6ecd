"""Property: any prompt and any sampling parameters through the API are either served or rejected cleanly.

Hypothesis draws prompts (text, token-id lists, dicts, junk) and sampling-parameter dicts mixing
valid values with wrong types, NaN/inf, out-of-range ints and unknown keys, and sends them
through `LLM.generate` on the in-process engine (tiny Llama). Each call must either
- return one finished output with n completions, each within max_tokens and the length limit, or
- raise an error of the `scheduler.errors` hierarchy with `.param` set and named in the message;
never anything else (a crash inside the engine), and afterwards the engine is untouched: no
unfinished request, every KV block free.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster import LLM, SamplingParams
from scheduler.errors import InvalidRequestError

MAX_MODEL_LEN = 24
VOCAB = 509

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def llm(tiny_llama_gqa_dir):
    with LLM(str(tiny_llama_gqa_dir), max_model_len=MAX_MODEL_LEN, max_n=3, max_logprobs=5) as engine:
        yield engine


JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.floats(allow_nan=True),
                 st.lists(st.integers(-2, 3), max_size=2),
                 st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
WIDE_INTS = st.one_of(st.integers(-3, 6), st.sampled_from([2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**9]))
FLOATS = st.one_of(st.floats(-3, 3), st.sampled_from([math.inf, -math.inf, math.nan, 1e300, 1e-300]))

FIELDS = {
    "n": st.one_of(WIDE_INTS, JUNK),
    "temperature": st.one_of(FLOATS, st.floats(0, 2), JUNK),
    "top_p": st.one_of(FLOATS, JUNK),
    "top_k": st.one_of(WIDE_INTS, JUNK),
    "min_p": st.one_of(FLOATS, JUNK),
    "seed": st.one_of(st.none(), WIDE_INTS, JUNK),
    "max_tokens": st.one_of(st.none(), st.integers(-1, 4), WIDE_INTS, JUNK),
    "min_tokens": st.one_of(st.integers(-1, 3), WIDE_INTS, JUNK),
    "stop": st.one_of(st.none(), st.text(max_size=2), st.lists(st.text(max_size=2), max_size=2), JUNK),
    "stop_token_ids": st.one_of(st.none(), st.lists(st.one_of(st.integers(-1, VOCAB + 1), JUNK), max_size=2), JUNK),
    "ignore_eos": st.one_of(st.booleans(), JUNK),
    "include_stop_str_in_output": st.one_of(st.booleans(), JUNK),
    "logprobs": st.one_of(st.none(), st.integers(-1, 7), JUNK),
    "presence_penalty": st.one_of(FLOATS, JUNK),
    "frequency_penalty": st.one_of(FLOATS, JUNK),
    "repetition_penalty": st.one_of(FLOATS, st.floats(0.1, 3), JUNK),
    "skip_special_tokens": st.one_of(st.booleans(), JUNK),
    "timeout": st.one_of(st.none(), FLOATS, st.floats(1, 1e6), JUNK),
}
UNKNOWN_KEYS = st.sampled_from(["temprature", "max_token", "best_of", "beam_width", ""])

VALID_FIELDS = {
    "n": st.integers(1, 3), "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1), "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 3)),
    "max_tokens": st.one_of(st.none(), st.integers(1, 4)), "min_tokens": st.integers(0, 1),
    "stop": st.one_of(st.none(), st.text(min_size=1, max_size=2, alphabet="abc ")),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=2), "ignore_eos": st.booleans(),
    "logprobs": st.one_of(st.none(), st.integers(0, 5)), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.1, 3),
    "skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(),
    "timeout": st.one_of(st.none(), st.floats(60, 1e6)),
}
VALID_PARAMS = st.fixed_dictionaries({}, optional=VALID_FIELDS)
ANY_PARAMS = st.fixed_dictionaries({}, optional=FIELDS | {"_unknown": UNKNOWN_KEYS}).map(
    lambda d: {k: v for k, v in d.items() if k != "_unknown"} | ({d["_unknown"]: 1} if "_unknown" in d else {}))
# mostly valid, with one field from anywhere (one wrong value in an otherwise good request), or anything
PARAMS = st.one_of(VALID_PARAMS, st.tuples(VALID_PARAMS, ANY_PARAMS).map(lambda t: t[0] | dict(list(t[1].items())[:1])),
                   ANY_PARAMS)
TOKEN_IDS = st.lists(st.one_of(st.integers(0, VOCAB - 1), st.integers(-2, VOCAB + 2), st.floats(0, 10),
                               st.booleans(), st.text(max_size=1)), max_size=MAX_MODEL_LEN + 2)
GOOD_PROMPTS = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30),
    st.fixed_dictionaries({"prompt_token_ids": st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)}),
)
PROMPTS = st.one_of(
    GOOD_PROMPTS,
    st.text(max_size=30),                                                   # includes lone surrogates
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=30),  # always encodable
    st.fixed_dictionaries({"prompt_token_ids": TOKEN_IDS}),
    st.fixed_dictionaries({"prompt_token_ids": st.lists(st.integers(2, VOCAB - 1), min_size=1, max_size=12)}),
    st.fixed_dictionaries({"prompt": st.text(max_size=10)}, optional={"prompt_token_ids": TOKEN_IDS}),
    st.lists(st.integers(2, VOCAB - 1), min_size=1, max_size=12).map(lambda ids: [ids]),   # [[ids]]
    JUNK,
    st.dictionaries(st.sampled_from(["prompt", "prompt_token_ids", "prompt_tokens", "text"]), JUNK, max_size=2),
)


STATS = {"calls": 0, "served": 0}


def _assert_engine_untouched(llm) -> None:
    assert not llm.engine.has_unfinished_requests(), "a call left a request behind"
    assert llm.engine.all_blocks_free(), "a call left KV blocks allocated"


def _assert_served(outs, prompt, params: dict) -> None:
    sp = SamplingParams(**params)
    assert len(outs) == (len(prompt) if isinstance(prompt, list) else 1)   # [] is an empty batch
    if not outs:
        return
    assert outs[0].finished and len(outs[0].outputs) == sp.n
    for c in outs[0].outputs:
        assert c.finish_reason in ("stop", "length")
        assert 1 <= len(c.token_ids) <= (sp.max_tokens or MAX_MODEL_LEN)
        assert len(outs[0].prompt_token_ids) + len(c.token_ids) <= MAX_MODEL_LEN
        assert all(isinstance(t, int) and 0 <= t < VOCAB for t in c.token_ids)
        if sp.logprobs is not None:
            assert len(c.logprobs) == len(c.token_ids)
            assert all(len(d) <= sp.logprobs + 1 and all(math.isfinite(v) or v == -math.inf for v in d.values())
                       for d in c.logprobs)


def _assert_rejected_cleanly(err: BaseException) -> None:
    assert isinstance(err, InvalidRequestError), f"{type(err).__name__} escaped the edge: {err!r}"
    assert err.param is not None, f"no .param on {err!r}"
    msg = str(err)
    # the name as given, or its repr when it holds characters a message must escape
    assert err.param in msg or repr(err.param) in msg or err.param in ("prompt", "prompts", "messages"), msg


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=PROMPTS, params=PARAMS, as_object=st.booleans())
def test_any_input_is_served_or_rejected_with_the_engine_untouched(llm, prompt, params, as_object):
    served = False
    STATS["calls"] += 1
    try:
        sampling = SamplingParams(**params) if as_object else params   # a dict goes through the same edge
        outs = llm.generate(prompt, sampling, use_tqdm=False)
        served = True
    except Exception as err:   # noqa: BLE001 - the property is about which exceptions escape
        _assert_rejected_cleanly(err)
    if served:
        STATS["served"] += 1
        _assert_served(outs, prompt, params)
    _assert_engine_untouched(llm)


def test_engine_serves_after_the_property_run(llm):
    # the property run must have exercised both sides, or it proves little
    assert STATS["served"] >= 10 and STATS["calls"] - STATS["served"] >= 10, STATS
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    _assert_engine_untouched(llm)
