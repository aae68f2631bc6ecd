"""Every bad input to the Python API is rejected at the edge, naming the parameter, and hurts nothing.

Each case is one call that must raise an error of the `scheduler.errors` hierarchy (a ValueError,
and also a TypeError for wrong types) whose `.param` names the parameter and whose message names
it too. After EVERY rejected call the engine must be exactly as before: no unfinished request,
every KV block free, and the next valid call served (the test makes one).
"""

from __future__ import annotations

import json
import shutil

import pytest

from cluster import LLM, BeamSearchParams, SamplingParams
from scheduler.errors import (
    ConfigError,
    ConfigTypeError,
    InvalidRequestError,
    InvalidTypeError,
    PromptError,
    PromptTooLongError,
    PromptTypeError,
    SamplingParamsError,
    SamplingParamsTypeError,
    UnknownArgumentError,
)
from tests.fixtures.reference import hf_greedy

MAX_MODEL_LEN = 48


@pytest.fixture(scope="module")
def llm(tiny_llama_gqa_dir):
    with LLM(str(tiny_llama_gqa_dir), max_model_len=MAX_MODEL_LEN, max_n=4) as engine:
        yield engine


def mutated(**changes) -> SamplingParams:
    """A valid SamplingParams changed after construction (it is mutable): the edge must re-check it."""
    p = SamplingParams(max_tokens=2)
    for k, v in changes.items():
        setattr(p, k, v)
    return p


def sp(**kw) -> dict:
    return {"max_tokens": 2} | kw


GOOD = "the fox"
# (id, call(llm), error class, param, text that must be in the message)
CASES = [
    # -- prompts
    ("prompts_int", lambda m: m.generate(42), PromptTypeError, "prompts", "got int"),
    ("prompts_list_of_ints", lambda m: m.generate([1, 2]), PromptTypeError, "prompts", "list of ints"),
    ("prompt_none_in_batch", lambda m: m.generate([GOOD, None]), PromptTypeError, "prompt", "prompts[1]"),
    ("prompt_float_in_batch", lambda m: m.generate([GOOD, 3.5]), PromptTypeError, "prompt", "prompts[1]"),
    ("prompt_empty_text", lambda m: m.generate(""), PromptError, "prompt", "empty"),
    ("prompt_lone_surrogate", lambda m: m.generate("ab\ud800c"), PromptError, "prompt", "surrogate"),
    ("prompt_ids_empty", lambda m: m.generate({"prompt_token_ids": []}), PromptError, "prompt_token_ids", "empty"),
    ("prompt_ids_as_str", lambda m: m.generate({"prompt_token_ids": "123"}), PromptTypeError, "prompt_token_ids",
     "not str"),
    ("prompt_ids_floats", lambda m: m.generate({"prompt_token_ids": [5.0, 6.0]}), PromptTypeError,
     "prompt_token_ids", "must be an int token id"),
    ("prompt_ids_str_item", lambda m: m.generate({"prompt_token_ids": [5, "6"]}), PromptTypeError,
     "prompt_token_ids", "prompt_token_ids[1]"),
    ("prompt_ids_bool_item", lambda m: m.generate({"prompt_token_ids": [True, 5]}), PromptTypeError,
     "prompt_token_ids", "not bool"),
    ("prompt_ids_negative", lambda m: m.generate({"prompt_token_ids": [5, -1]}), PromptError, "prompt_token_ids",
     "outside the tokenizer's vocabulary"),
    ("prompt_ids_past_vocab", lambda m: m.generate({"prompt_token_ids": [999999]}), PromptError,
     "prompt_token_ids", "token id 999999 is outside the tokenizer's vocabulary [0, 509)"),
    ("prompt_ids_nested_batch", lambda m: m.generate([[5, 6], [7, 600]]), PromptError, "prompt_token_ids",
     "prompts[1]"),
    ("prompt_dict_unknown_key", lambda m: m.generate({"prompt_tokens": [5]}), UnknownArgumentError,
     "prompt_tokens", "did you mean 'prompt_token_ids'"),
    ("prompt_dict_empty", lambda m: m.generate({}), PromptError, "prompt", "needs 'prompt'"),
    ("prompt_dict_text_not_str", lambda m: m.generate({"prompt": 5}), PromptTypeError, "prompt", "must be a str"),
    ("prompt_too_long", lambda m: m.generate({"prompt_token_ids": [5] * MAX_MODEL_LEN}), PromptTooLongError,
     "prompt", f"max_model_len is {MAX_MODEL_LEN}"),
    # -- sampling parameters
    ("params_str", lambda m: m.generate(GOOD, "greedy"), SamplingParamsTypeError, "sampling_params",
     "must be a SamplingParams"),
    ("params_count", lambda m: m.generate([GOOD, GOOD], [SamplingParams()]), SamplingParamsError,
     "sampling_params", "got 1 sampling_params for 2 prompts"),
    ("params_dict_misspelt", lambda m: m.generate(GOOD, {"max_token": 4}), UnknownArgumentError, "max_token",
     "did you mean 'max_tokens'"),
    ("params_kw_misspelt", lambda m: SamplingParams(temprature=0.5), UnknownArgumentError, "temprature",
     "did you mean 'temperature'"),
    ("n_huge", lambda m: m.generate(GOOD, sp(n=10**9)), SamplingParamsError, "n", "max_n"),
    ("n_bool", lambda m: m.generate(GOOD, sp(n=True)), SamplingParamsTypeError, "n", "not bool"),
    ("n_mutated_huge", lambda m: m.generate(GOOD, mutated(n=10**9)), SamplingParamsError, "n", "max_n"),
    ("logprobs_huge", lambda m: m.generate(GOOD, sp(logprobs=10**6)), SamplingParamsError, "logprobs",
     "max_logprobs"),
    ("logprobs_21", lambda m: m.generate(GOOD, sp(logprobs=21)), SamplingParamsError, "logprobs", "[0, 20]"),
    ("logprobs_bool", lambda m: m.generate(GOOD, sp(logprobs=True)), SamplingParamsTypeError, "logprobs",
     "not bool"),
    ("temperature_inf", lambda m: m.generate(GOOD, sp(temperature=float("inf"))), SamplingParamsError,
     "temperature", "finite"),
    ("temperature_nan", lambda m: m.generate(GOOD, sp(temperature=float("nan"))), SamplingParamsError,
     "temperature", "finite"),
    ("temperature_str", lambda m: m.generate(GOOD, sp(temperature="0.5")), SamplingParamsTypeError,
     "temperature", "must be a number"),
    ("temperature_mutated_negative", lambda m: m.generate(GOOD, mutated(temperature=-1.0)), SamplingParamsError,
     "temperature", ">= 0"),
    ("presence_penalty_inf", lambda m: m.generate(GOOD, sp(presence_penalty=float("inf"))), SamplingParamsError,
     "presence_penalty", "[-2, 2]"),
    ("repetition_penalty_inf", lambda m: m.generate(GOOD, sp(repetition_penalty=float("inf"))),
     SamplingParamsError, "repetition_penalty", "finite"),
    ("frequency_penalty_nan", lambda m: m.generate(GOOD, sp(frequency_penalty=float("nan"))), SamplingParamsError,
     "frequency_penalty", "finite"),
    ("seed_past_64_bits", lambda m: m.generate(GOOD, sp(seed=2**64)), SamplingParamsError, "seed", "2**63"),
    ("seed_plus_n_overflows", lambda m: m.generate(GOOD, sp(seed=2**63 - 1, n=2)), SamplingParamsError, "seed",
     "seed + i"),
    ("seed_float", lambda m: m.generate(GOOD, sp(seed=1.0)), SamplingParamsTypeError, "seed", "not float"),
    ("stop_dict", lambda m: m.generate(GOOD, sp(stop={"a": 1})), SamplingParamsTypeError, "stop",
     "must be a str or a list of str"),
    ("stop_int_item", lambda m: m.generate(GOOD, sp(stop=["ok", 1])), SamplingParamsTypeError, "stop",
     "non-empty str"),
    ("stop_empty", lambda m: m.generate(GOOD, sp(stop="")), SamplingParamsError, "stop", "non-empty str"),
    ("stop_surrogate", lambda m: m.generate(GOOD, sp(stop="\udfff")), SamplingParamsError, "stop", "surrogate"),
    ("ignore_eos_str", lambda m: m.generate(GOOD, sp(ignore_eos="false")), SamplingParamsTypeError, "ignore_eos",
     "True or False"),
    ("skip_special_tokens_int", lambda m: m.generate(GOOD, sp(skip_special_tokens=1)), SamplingParamsTypeError,
     "skip_special_tokens", "True or False"),
    ("include_stop_str_none", lambda m: m.generate(GOOD, sp(include_stop_str_in_output=None)),
     SamplingParamsTypeError, "include_stop_str_in_output", "True or False"),
    ("stop_token_ids_float", lambda m: m.generate(GOOD, sp(stop_token_ids=[1.5])), SamplingParamsTypeError,
     "stop_token_ids", "not float"),
    ("stop_token_ids_str", lambda m: m.generate(GOOD, sp(stop_token_ids="5")), SamplingParamsTypeError,
     "stop_token_ids", "list of token ids"),
    ("stop_token_ids_past_vocab", lambda m: m.generate(GOOD, sp(stop_token_ids=[10**6])), SamplingParamsError,
     "stop_token_ids", "[0, 509)"),
    ("top_k_float", lambda m: m.generate(GOOD, sp(top_k=2.0)), SamplingParamsTypeError, "top_k", "not float"),
    ("top_k_huge", lambda m: m.generate(GOOD, sp(top_k=2**70)), SamplingParamsError, "top_k", "2147483647"),
    ("top_p_zero", lambda m: m.generate(GOOD, sp(top_p=0.0)), SamplingParamsError, "top_p", "(0, 1]"),
    ("max_tokens_zero", lambda m: m.generate(GOOD, sp(max_tokens=0)), SamplingParamsError, "max_tokens", "[1, "),
    ("max_tokens_huge", lambda m: m.generate(GOOD, sp(max_tokens=2**70)), SamplingParamsError, "max_tokens",
     "2147483647"),
    ("min_tokens_over_max", lambda m: m.generate(GOOD, sp(min_tokens=5)), SamplingParamsError, "min_tokens",
     "max_tokens=2"),
    ("timeout_zero", lambda m: m.generate(GOOD, sp(timeout=0)), SamplingParamsError, "timeout", "> 0 seconds"),
    ("timeout_str", lambda m: m.generate(GOOD, sp(timeout="5s")), SamplingParamsTypeError, "timeout",
     "must be a number"),
    # -- chat
    ("chat_missing_role", lambda m: m.chat([{"content": "hi"}]), PromptError, "messages", "messages[0] needs a 'role'"),
    ("chat_content_int", lambda m: m.chat([{"role": "user", "content": 5}]), PromptTypeError, "messages",
     "['content']=5"),
    ("chat_str", lambda m: m.chat("hello"), PromptTypeError, "messages", "non-empty list"),
    ("chat_bad_template", lambda m: m.chat([{"role": "user", "content": "hi"}], chat_template="{% if %}"),
     PromptError, "messages", "chat template could not render"),
    ("chat_second_conversation_bad", lambda m: m.chat([[{"role": "user", "content": "a"}], [{"role": 1}]]),
     PromptError, "messages", "messages[1][0]"),
    # -- beam search
    ("beam_width_too_wide", lambda m: m.beam_search(GOOD, BeamSearchParams(beam_width=5, max_tokens=2)),
     SamplingParamsError, "beam_width", "max_n"),
    ("beam_params_dict", lambda m: m.beam_search(GOOD, {"beam_width": 2}), SamplingParamsTypeError, "params",
     "must be a BeamSearchParams"),
    ("beam_length_penalty_inf", lambda m: BeamSearchParams(beam_width=2, max_tokens=2, length_penalty=float("inf")),
     SamplingParamsError, "length_penalty", "finite"),
    ("beam_prompt_float_ids", lambda m: m.beam_search([{"prompt_token_ids": [1.5]}],
                                                      BeamSearchParams(beam_width=2, max_tokens=2)),
     PromptTypeError, "prompt_token_ids", "prompts[0]"),
    # -- the engine itself (what the server calls)
    ("engine_request_id_int", lambda m: m.engine.add_request(5, [5, 6]), InvalidTypeError, "request_id",
     "must be a str"),
    ("engine_params_dict_misspelt", lambda m: m.engine.add_request("x", [5, 6], {"temperatur": 0}),
     UnknownArgumentError, "temperatur", "did you mean 'temperature'"),
]


def assert_untouched_and_serving(llm) -> None:
    eng = llm.engine
    assert not eng.has_unfinished_requests(), "a rejected call left a request behind"
    assert eng.all_blocks_free(), "a rejected call left KV blocks allocated"
    assert all(not s.has_unfinished() for s in eng.schedulers)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)
    assert len(out) == 1 and out[0].finished and len(out[0].outputs[0].token_ids) == 3


@pytest.mark.parametrize("call,error,param,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_naming_the_parameter_and_changes_nothing(llm, call, error, param, text):
    with pytest.raises(error) as e:
        call(llm)
    err = e.value
    assert isinstance(err, InvalidRequestError) and isinstance(err, ValueError)
    assert err.param == param, f"param {err.param!r} != {param!r}: {err}"
    assert text in str(err), str(err)
    assert param in str(err) or param in ("prompt", "prompts", "sampling_params"), str(err)
    if isinstance(err, InvalidTypeError):
        assert isinstance(err, TypeError)
    assert_untouched_and_serving(llm)


def test_a_batch_with_one_bad_prompt_admits_none_of_it(llm):
    before = llm.engine.num_steps
    with pytest.raises(PromptTypeError, match=r"prompts\[2\]"):
        llm.generate([GOOD, {"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [1.0]}], SamplingParams(max_tokens=2),
                     use_tqdm=False)
    assert llm.engine.num_steps == before, "the engine stepped for a rejected call"
    assert_untouched_and_serving(llm)


def test_dict_sampling_params_are_accepted_and_equal_hf(llm, tiny_llama_gqa_dir):
    # the call of the issue's first defect: it used to half-admit a request and break the engine
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, {"max_tokens": 4, "temperature": 0, "ignore_eos": True},
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(str(tiny_llama_gqa_dir), [5, 6, 7], 4)[0]
    assert_untouched_and_serving(llm)


def test_nested_token_id_list_is_one_prompt(llm, tiny_llama_gqa_dir):
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert out[0].prompt_token_ids == [5, 6, 7]
    assert out[0].outputs[0].token_ids == hf_greedy(str(tiny_llama_gqa_dir), [5, 6, 7], 3)[0]


def test_engine_still_generates_after_errors(llm):
    assert llm.generate([], use_tqdm=False) == []
    out = llm.generate("the fox", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


# -- LLM(...) options: rejected before any rank starts

LLM_CASES = [
    ("misspelt_tp", {"tensor_paralel_size": 2}, UnknownArgumentError, "tensor_paralel_size",
     "did you mean 'tensor_parallel_size'"),
    ("unknown_quantization", {"quantization": "int9"}, ConfigError, "quantization", "did you mean 'int8'"),
    ("misspelt_quantization_kw", {"quantisation": "int8"}, UnknownArgumentError, "quantisation",
     "did you mean 'quantization'"),
    ("misspelt_address", {"adress": "127.0.0.1:1"}, UnknownArgumentError, "adress", "did you mean 'address'"),
    ("prefix_caching_str", {"enable_prefix_caching": "yes"}, ConfigTypeError, "enable_prefix_caching",
     "True or False"),
    ("max_num_seqs_float", {"max_num_seqs": 2.5}, ConfigTypeError, "max_num_seqs", "not float"),
    ("dtype_fp8", {"dtype": "fp8"}, ConfigError, "dtype", "choose one of"),
    ("seed_past_64_bits", {"seed": 2**70}, ConfigError, "seed", "64-bit"),
    ("max_model_len_str", {"max_model_len": "64"}, ConfigTypeError, "max_model_len", "not str"),
    ("max_model_len_past_model", {"max_model_len": 10**6}, ConfigError, "max_model_len", "max_position_embeddings"),
    ("cpus_per_worker_negative", {"cpus_per_worker": -1.0}, ConfigError, "cpus_per_worker", "> 0"),
    ("step_timeout_inf", {"step_timeout_s": float("inf")}, ConfigError, "step_timeout_s", "finite"),
    ("use_gpu_str", {"use_gpu": "no"}, ConfigTypeError, "use_gpu", "True or False"),
    ("max_logprobs_negative", {"max_logprobs": -1}, ConfigError, "max_logprobs", ">= 0"),
    ("address_int", {"address": 6379}, ConfigTypeError, "address", "must be a str"),
    ("max_waiting_requests_zero", {"max_waiting_requests": 0}, ConfigError, "max_waiting_requests", ">= 1"),
    ("max_waiting_requests_float", {"max_waiting_requests": 8.0}, ConfigTypeError, "max_waiting_requests",
     "not float"),
]


@pytest.mark.parametrize("kwargs,error,param,text", [c[1:] for c in LLM_CASES], ids=[c[0] for c in LLM_CASES])
def test_bad_llm_option_is_rejected_naming_it(tiny_llama_gqa_dir, kwargs, error, param, text):
    with pytest.raises(error) as e:
        LLM(str(tiny_llama_gqa_dir), **kwargs)
    assert e.value.param == param and text in str(e.value) and param in str(e.value), str(e.value)


def test_model_of_wrong_type_and_bad_config_json_are_named(tiny_llama_gqa_dir, tmp_path):
    with pytest.raises(ConfigTypeError, match="model=123 must be a path") as e:
        LLM(123)
    assert e.value.param == "model"
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_gqa_dir, broken)
    (broken / "config.json").write_text(json.dumps({"model_type": "llama"})[:-1])   # truncated JSON
    with pytest.raises(ConfigError, match=f"{broken / 'config.json'} is not valid JSON") as e:
        LLM(str(broken))
    assert e.value.param == "model"


def test_explicit_ray_options_are_config_fields_not_a_catch_all(tiny_llama_gqa_dir):
    with LLM(str(tiny_llama_gqa_dir), cpus_per_worker=0.5, step_timeout_s=30.0, placement_timeout_s=5.0,
             max_logprobs=5) as llm:
        assert (llm.config.cpus_per_worker, llm.config.step_timeout_s, llm.config.placement_timeout_s) == \
            (0.5, 30.0, 5.0)
        assert not hasattr(llm.config, "extra")
        with pytest.raises(SamplingParamsError, match=r"logprobs=6 .*\[0, 5\]"):
            llm.generate(GOOD, SamplingParams(logprobs=6), use_tqdm=False)


NUM_BAD_INPUTS = len(CASES) + len(LLM_CASES) + 3   # + model type, bad config.json, max_logprobs=5 bound
