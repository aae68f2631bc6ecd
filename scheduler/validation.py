"""The request edge: every prompt and sampling parameter is checked here, once, before the engine sees it.

`LLM.generate/chat/beam_search`, the CLI, `LLMEngine.add_request` and the HTTP server all call
these functions, with the bounds of one engine (`RequestLimits`, from `LLMEngine.limits`):

    ids = prompt_token_ids("Hello", tokenizer, limits)                    # str -> token ids
    ids = prompt_token_ids({"prompt_token_ids": [5, 6]}, tokenizer, limits)
    params = check_sampling_params({"temperature": 0, "max_tokens": 8}, limits)

Every rejection is a `scheduler.errors.InvalidRequestError` (a ValueError; wrong types are
also TypeErrors) whose `.param` names the parameter and whose message names the value and
what is allowed. Nothing here has side effects, so a caller validates a whole batch first and
admits it only if every item passed: a rejected call leaves the engine exactly as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.checks import check_int
from scheduler.errors import (
    InvalidRequestError,
    PromptError,
    PromptTooLongError,
    PromptTypeError,
    SamplingParamsError,
    SamplingParamsTypeError,
    reject_unknown,
    show,
)
from scheduler.sampling_params import SamplingParams

PROMPT_KEYS = ("prompt", "prompt_token_ids")
MESSAGE_CONTENT_TYPES = (str, list, type(None))   # OpenAI: text, a list of content parts, or None


@dataclass(frozen=True)
class RequestLimits:
    """What one engine can serve; the bounds every request is checked against."""

    vocab_size: int           # token ids must be in [0, vocab_size)
    max_model_len: int        # prompt + at least one output token must fit
    kv_capacity_tokens: int   # KV cache of one replica, in tokens
    max_logprobs: int         # EngineConfig.max_logprobs
    max_n: int                # EngineConfig.max_n
    block_size: int = 16


# -- sampling parameters -------------------------------------------------------------------


def check_sampling_params(params, limits: RequestLimits, param: str = "sampling_params") -> SamplingParams:
    """A SamplingParams (re-validated: it is mutable) or a dict of its fields -> SamplingParams within `limits`."""
    if isinstance(params, dict):
        params = SamplingParams.from_dict(params)
    elif not isinstance(params, SamplingParams):
        raise SamplingParamsTypeError(f"{param}={show(params)} must be a SamplingParams or a dict of its fields, "
                                      f"not {type(params).__name__}", param, params)
    else:
        params.validate()
    _err = {"err": SamplingParamsError, "type_err": SamplingParamsTypeError}
    check_int("n", params.n, lo=1, hi=limits.max_n, hint=f"in [1, {limits.max_n}] (max_n of this engine)", **_err)
    hi = min(limits.max_logprobs, limits.vocab_size)
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(params, name) is not None:
            check_int(name, getattr(params, name), lo=0, hi=hi,
                      hint=f"None or in [0, {hi}] (max_logprobs of this engine; raise it with LLM(max_logprobs=...))",
                      **_err)
    for t in params.stop_token_ids:
        check_int("stop_token_ids", t, lo=0, hi=limits.vocab_size - 1,
                  hint=f"token ids in [0, {limits.vocab_size}) (the tokenizer's vocabulary)", **_err)
    return params


def params_per_prompt(sampling_params, num_prompts: int, limits: RequestLimits) -> list[SamplingParams]:
    """None (defaults), one SamplingParams/dict for all prompts, or a list with one per prompt."""
    if sampling_params is None:
        return [SamplingParams()] * num_prompts
    if isinstance(sampling_params, (SamplingParams, dict)):
        return [check_sampling_params(sampling_params, limits)] * num_prompts
    if not isinstance(sampling_params, (list, tuple)):
        raise SamplingParamsTypeError(f"sampling_params={show(sampling_params)} must be a SamplingParams, a dict, "
                                      f"or a list of one per prompt; not {type(sampling_params).__name__}",
                                      "sampling_params", sampling_params)
    if len(sampling_params) != num_prompts:
        raise SamplingParamsError(f"got {len(sampling_params)} sampling_params for {num_prompts} prompts; "
                                  "give one, or one per prompt", "sampling_params", len(sampling_params))
    out = []
    for i, p in enumerate(sampling_params):
        try:
            out.append(check_sampling_params(p, limits, f"sampling_params[{i}]"))
        except SamplingParamsError as e:
            raise e.at(f"sampling_params[{i}]") from None
    return out


# -- prompts -----------------------------------------------------------------------------


def as_prompt_list(prompts) -> list:
    """The `prompts` argument of generate: one prompt (str or dict) or a list/tuple of prompts."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            raise PromptTypeError(f"prompts={show(prompts)} is a list of ints: a list holds prompts. For one "
                                  f"token-id prompt pass {{'prompt_token_ids': [...]}} or [[...]]", "prompts", prompts)
        return list(prompts)
    raise PromptTypeError(f"prompts must be a str, a {{'prompt_token_ids': [...]}} dict, or a list of those; "
                          f"got {type(prompts).__name__}", "prompts", prompts)


def split_prompt(prompt) -> tuple[str | None, list | None]:
    """str / token-id list / {"prompt_token_ids", "prompt"} dict / {"prompt"} dict -> (text, ids), types checked."""
    if isinstance(prompt, str):
        return check_text(prompt), None
    if isinstance(prompt, (list, tuple)):
        return None, list(prompt)
    if isinstance(prompt, dict):
        reject_unknown(prompt, PROMPT_KEYS, "a prompt dict")
        text = prompt.get("prompt")
        if text is not None:
            if not isinstance(text, str):
                raise PromptTypeError(f"prompt={show(text)} must be a str, not {type(text).__name__}", "prompt", text)
            check_text(text)
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, (list, tuple)):
                raise PromptTypeError(f"prompt_token_ids={show(ids)} must be a list of int token ids, "
                                      f"not {type(ids).__name__}", "prompt_token_ids", ids)
            return text, list(ids)
        if text is None:
            raise PromptError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids' (a list of ints); "
                              f"got keys {sorted(prompt)}", "prompt", prompt)
        return text, None
    raise PromptTypeError(f"a prompt must be a str, a list of token ids, or a dict with 'prompt_token_ids' or "
                          f"'prompt'; got {type(prompt).__name__} {show(prompt)}", "prompt", prompt)


def split_prompts(prompts) -> list[tuple[str | None, list | None]]:
    """`split_prompt` over the `prompts` argument of generate; an error names the bad index (`prompts[i]`)."""
    items = as_prompt_list(prompts)
    out = []
    for i, p in enumerate(items):
        try:
            out.append(split_prompt(p))
        except InvalidRequestError as e:
            raise e.at(f"prompts[{i}]") if len(items) > 1 else e from None
    return out


def check_text(text: str, param: str = "prompt", label: str | None = None) -> str:
    """Text the tokenizer can take: valid Unicode (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"{label or param}={show(text)} is not valid Unicode text ({e.reason} at position "
                          f"{e.start}); remove the lone surrogate", param, text) from None
    return text


def check_token_ids(ids: Sequence, limits: RequestLimits, param: str = "prompt_token_ids") -> list[int]:
    """Non-empty ints (not floats, strings or bools) in the vocabulary, short enough to run."""
    n = len(ids)
    if n == 0:
        raise PromptError(f"the prompt is empty ({param} has no tokens); give at least one token", param, [])
    vocab = limits.vocab_size
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool):
            raise PromptTypeError(f"{param}[{i}]={show(t)} must be an int token id, not {type(t).__name__}",
                                  param, t)
        if not 0 <= t < vocab:
            raise PromptError(f"prompt token id {t} is outside the tokenizer's vocabulary [0, {vocab}) "
                              f"(at {param}[{i}])", param, t)
    if n >= limits.max_model_len:
        raise PromptTooLongError(f"prompt has {n} tokens but max_model_len is {limits.max_model_len}: "
                                 "prompt + at least one output token must fit", n, limits.max_model_len, param, n)
    if n + 1 > limits.kv_capacity_tokens:
        raise PromptTooLongError(f"prompt has {n} tokens but the KV cache holds at most {limits.kv_capacity_tokens} "
                                 f"tokens per replica ({limits.kv_capacity_tokens // limits.block_size} blocks x "
                                 f"{limits.block_size}); raise num_kv_blocks/kv_cache_memory or shorten the prompt",
                                 n, limits.kv_capacity_tokens, param, n)
    return list(ids)


def prompt_token_ids(prompt, tokenizer, limits: RequestLimits) -> tuple[str | None, list[int]]:
    """One prompt -> (text or None, validated token ids). Text is tokenized with the tokenizer's special tokens."""
    text, ids = split_prompt(prompt)
    if ids is None:
        ids = tokenizer.encode(text).ids
        return text, check_token_ids(ids, limits, "prompt")
    return text, check_token_ids(ids, limits)


# -- chat ----------------------------------------------------------------------------------


def check_conversations(messages) -> list[list[dict]]:
    """One conversation (a list of {"role", "content"} dicts) or a list of them, each message checked."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptTypeError(f"messages={show(messages)} must be a non-empty list of {{'role', 'content'}} dicts "
                              "(one conversation) or a list of such lists", "messages", messages)
    convs = [messages] if isinstance(messages[0], dict) else list(messages)
    for c, conv in enumerate(convs):
        where = f"messages[{c}]" if len(convs) > 1 or not isinstance(messages[0], dict) else "messages"
        if not isinstance(conv, (list, tuple)) or not conv:
            raise PromptTypeError(f"{where}={show(conv)} must be a non-empty list of {{'role', 'content'}} dicts",
                                  "messages", conv)
        for m, msg in enumerate(conv):
            _check_message(f"{where}[{m}]", msg)
    return [list(conv) for conv in convs]


def _check_message(where: str, msg) -> None:
    if not isinstance(msg, dict):
        raise PromptTypeError(f"{where}={show(msg)} must be a dict with 'role' and 'content', "
                              f"not {type(msg).__name__}", "messages", msg)
    role = msg.get("role")
    if not isinstance(role, str) or not role:
        raise PromptError(f"{where} needs a 'role' (a non-empty str such as 'user'); got {show(msg)}", "messages", msg)
    content = msg.get("content")
    if not isinstance(content, MESSAGE_CONTENT_TYPES):
        raise PromptTypeError(f"{where}['content']={show(content)} must be a str (or a list of content parts), "
                              f"not {type(content).__name__}", "messages", msg)
    if isinstance(content, str):
        check_text(content, "messages", f"{where}['content']")
