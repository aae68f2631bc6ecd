"""The request edge without a model: the error hierarchy and the validation functions the server reuses."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from scheduler.config import ConfigError, EngineConfig
from scheduler.engine import PromptTooLongError as EnginePromptTooLongError
from scheduler.errors import (
    ConfigTypeError,
    InvalidRequestError,
    InvalidTypeError,
    PromptError,
    PromptTooLongError,
    PromptTypeError,
    SamplingParamsTypeError,
    UnknownArgumentError,
    reject_unknown,
)
from scheduler.sampling_params import SamplingParams, SamplingParamsError
from scheduler.validation import (
    RequestLimits,
    as_prompt_list,
    check_conversations,
    check_sampling_params,
    params_per_prompt,
    prompt_token_ids,
)
from sharding.plan import LayoutError

LIMITS = RequestLimits(vocab_size=100, max_model_len=10, kv_capacity_tokens=8, max_logprobs=5, max_n=4,
                       block_size=4)
TOKENIZER = Tokenizer(models.WordLevel({f"w{i}": i for i in range(99)} | {"[UNK]": 99}, unk_token="[UNK]"))
TOKENIZER.pre_tokenizer = pre_tokenizers.WhitespaceSplit()


def test_one_hierarchy_value_and_type_errors_alike():
    for cls in (SamplingParamsError, ConfigError, PromptError, PromptTooLongError, LayoutError):
        assert issubclass(cls, InvalidRequestError) and issubclass(cls, ValueError)
    for cls in (InvalidTypeError, UnknownArgumentError, SamplingParamsTypeError, ConfigTypeError, PromptTypeError):
        assert issubclass(cls, InvalidRequestError) and issubclass(cls, TypeError) and issubclass(cls, ValueError)
    assert EnginePromptTooLongError is PromptTooLongError    # still importable where it was


def test_error_carries_param_value_and_a_located_copy():
    e = SamplingParamsError("n=0 is out of range", "n", 0)
    located = e.at("sampling_params[2]")
    assert (located.param, located.value, type(located)) == ("n", 0, SamplingParamsError)
    assert str(located) == "sampling_params[2]: n=0 is out of range" and str(e) == "n=0 is out of range"
    too_long = PromptTooLongError("prompt has 12 tokens", 12, 10).at("prompts[1]")
    assert (too_long.prompt_len, too_long.max_len, too_long.param) == (12, 10, "prompt")


def test_unknown_argument_names_the_closest_valid_one():
    with pytest.raises(UnknownArgumentError, match=r"'max_tokns'; did you mean 'max_tokens'\?") as e:
        reject_unknown({"max_tokns": 3}, ["max_tokens", "n"], "SamplingParams")
    assert e.value.param == "max_tokns"
    with pytest.raises(UnknownArgumentError, match=r"unknown argument 'zzz' \(valid: a, b\)"):
        reject_unknown(["zzz"], ["a", "b"], "f()")


def test_sampling_params_from_dict_and_engine_bounds():
    assert check_sampling_params({"n": 2, "logprobs": 5, "prompt_logprobs": 5}, LIMITS).n == 2
    for bad, param in (({"n": 5}, "n"), ({"logprobs": 6}, "logprobs"), ({"prompt_logprobs": 6}, "prompt_logprobs"),
                       ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"stop_token_ids": [100]}, "stop_token_ids")):
        with pytest.raises(SamplingParamsError) as e:
            check_sampling_params(bad, LIMITS)
        assert e.value.param == param
    with pytest.raises(SamplingParamsTypeError, match="must be a SamplingParams or a dict"):
        check_sampling_params(["n", 1], LIMITS)
    with pytest.raises(SamplingParamsTypeError, match="prompt_logprobs"):
        check_sampling_params({"prompt_logprobs": 1.5}, LIMITS)
    mutated = SamplingParams()
    mutated.top_p = 5.0
    with pytest.raises(SamplingParamsError, match=r"top_p=5.0 is out of range"):
        check_sampling_params(mutated, LIMITS)


def test_params_per_prompt_names_the_bad_index():
    with pytest.raises(SamplingParamsError, match=r"^sampling_params\[1\]: n=9 is out of range") as e:
        params_per_prompt([{"n": 1}, {"n": 9}], 2, LIMITS)
    assert e.value.param == "n"
    assert len(params_per_prompt(None, 3, LIMITS)) == 3


def test_prompt_forms_and_limits():
    assert prompt_token_ids("w5 w6", TOKENIZER, LIMITS) == ("w5 w6", [5, 6])
    with pytest.raises(PromptError, match="surrogate"):
        prompt_token_ids("w5 \ud800", TOKENIZER, LIMITS)
    assert prompt_token_ids([5, 6], TOKENIZER, LIMITS) == (None, [5, 6])
    assert prompt_token_ids({"prompt_token_ids": (5, 6), "prompt": "x"}, TOKENIZER, LIMITS) == ("x", [5, 6])
    with pytest.raises(PromptTooLongError, match="max_model_len is 10"):
        prompt_token_ids([1] * 10, TOKENIZER, LIMITS)
    with pytest.raises(PromptTooLongError, match=r"KV cache holds at most 8 tokens per replica \(2 blocks x 4\)"):
        prompt_token_ids([1] * 8, TOKENIZER, LIMITS)
    with pytest.raises(PromptTypeError, match=r"prompt_token_ids\[1\]=2.0 must be an int token id"):
        prompt_token_ids([1, 2.0], TOKENIZER, LIMITS)
    assert as_prompt_list("x") == ["x"] and as_prompt_list(("a", "b")) == ["a", "b"]


def test_conversations_are_checked_before_any_template():
    conv = [{"role": "user", "content": "hi"}]
    assert check_conversations(conv) == [conv] and check_conversations([conv, conv]) == [conv, conv]
    with pytest.raises(PromptError, match=r"messages\[1\] needs a 'role'"):
        check_conversations([{"role": "system", "content": "x"}, {"content": "y"}])


def test_engine_config_options_are_typed_fields():
    cfg = EngineConfig(model="m", cpus_per_worker=0.5, use_gpu=False, layer_split=[3, 1], resource_wait_s=0)
    assert cfg.layer_split == (3, 1) and cfg.max_logprobs == 20 and cfg.step_timeout_s is None
    for kwargs, param in (({"use_gpu": 1}, "use_gpu"), ({"layer_split": "3,1"}, "layer_split"),
                          ({"placement_timeout_s": 0}, "placement_timeout_s"), ({"tensor_parallel_size": True},
                                                                                "tensor_parallel_size")):
        with pytest.raises(ConfigError) as e:
            EngineConfig(model="m", **kwargs)
        assert e.value.param == param and param in str(e.value)
    with pytest.raises(TypeError):
        EngineConfig(model="m", extra={"cpus_per_worker": 1})     # the catch-all is gone
