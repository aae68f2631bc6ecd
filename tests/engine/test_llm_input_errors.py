"""Wrong inputs to `LLM.generate` get an error that says what to give instead; the engine stays usable."""

from __future__ import annotations

import pytest

from cluster import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_gqa_dir):
    with LLM(str(tiny_llama_gqa_dir)) as engine:
        yield engine


@pytest.mark.parametrize("prompts,error,match", [
    (42, TypeError, r"prompts must be a str, a \{'prompt_token_ids': \[...\]\} dict, or a list of those; got int"),
    ([1, 2], TypeError, r"a prompt must be a str or a dict with 'prompt_token_ids'"),
    ("", ValueError, r"the prompt is empty"),
    ({"prompt_token_ids": [999999]}, ValueError, r"token id 999999 is outside the tokenizer's vocabulary"),
])
def test_bad_prompt_is_rejected_clearly(llm, prompts, error, match):
    with pytest.raises(error, match=match):
        llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and llm.engine.all_blocks_free()


def test_sampling_params_count_must_match_prompts(llm):
    with pytest.raises(ValueError, match="got 1 sampling_params for 2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)


def test_engine_still_generates_after_errors(llm):
    assert llm.generate([], use_tqdm=False) == []
    out = llm.generate("the fox", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
