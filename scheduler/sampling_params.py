"""Per-request sampling parameters, with vLLM's names and meanings.

Differences from vLLM worth knowing:
- `top_k`: 0 or -1 both mean "no limit" (vLLM accepts both); the wire always carries -1.
- `best_of` and beam search flags are not here: beam search has its own driver
  (`scheduler.beam_search`) and its own `BeamSearchParams`.
- `max_tokens=None` means "until the model's length limit", as in vLLM.
- `cumulative_logprob` is always reported (vLLM v1 reports it only with `logprobs`).
- `timeout` (Shardline's extension): a deadline in seconds from admission; a request still
  unfinished then ends with finish_reason "timeout" (its tokens so far kept, its blocks freed).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from scheduler.checks import INT64_MAX, INT64_MIN, check_bool, check_int, check_number
from scheduler.errors import SamplingParamsError, SamplingParamsTypeError, reject_unknown, show
from scheduler.wire import SeqSampling

__all__ = ["SamplingParams", "SamplingParamsError", "SamplingParamsTypeError"]

_GREEDY_EPS = 1e-5  # temperatures below this are greedy, as in vLLM
_ERR = {"err": SamplingParamsError, "type_err": SamplingParamsTypeError}
WIRE_INT_MAX = 2**31 - 1  # top_k, min_tokens, max_tokens: ints the sampler and msgpack carry safely


@dataclass(slots=True)
class SamplingParams:
    """How to sample the outputs of one request (vLLM names and defaults)."""

    n: int = 1
    """Output sequences to return for the prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set whose probability reaches top_p, in (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1 disables the limit."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's, in [0, 1]."""
    seed: int | None = None
    """Per-request seed; with n > 1 output i uses seed + i. None: the replica's shared generator."""
    max_tokens: int | None = 16
    """Most output tokens per sequence; None: until max_model_len."""
    min_tokens: int = 0
    """EOS and stop_token_ids are suppressed (and stop strings ignored) until this many outputs."""
    stop: str | list[str] | None = None
    """Strings that end the output; the returned text stops before them."""
    stop_token_ids: list[int] | None = None
    """Token ids that end the output (kept in token_ids, like EOS)."""
    ignore_eos: bool = False
    """Keep generating after EOS (benchmarks)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the returned text."""
    logprobs: int | None = None
    """Return the sampled token's logprob plus this many top logprobs per output token; None: none."""
    prompt_logprobs: int | None = None
    """Return, per prompt token, its logprob plus this many top logprobs (vLLM); None: none.
    Those positions are always computed (the prefix cache is not used for this request's prompt)."""
    presence_penalty: float = 0.0
    """Subtracted from the logits of tokens already in the output, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence in the output, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """HF-style multiplicative penalty over prompt and output tokens; 1 disables it; > 0."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the returned text."""
    timeout: float | None = None
    """Seconds from admission after which the request ends with finish_reason "timeout"; None: no deadline."""
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's type and range (again: the object is mutable, so the edge re-checks it).

        Bounds that depend on the engine (n, logprobs, token ids against the vocabulary) are
        checked by `scheduler.validation.check_sampling_params`.
        """
        check_int("n", self.n, lo=1, **_ERR)
        check_number("temperature", self.temperature, ">= 0", lambda v: v >= 0, **_ERR)
        check_number("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1, **_ERR)
        check_int("top_k", self.top_k, lo=-1, hi=WIRE_INT_MAX,
                  hint=f"-1 or 0 to disable, or a k in [1, {WIRE_INT_MAX}]", **_ERR)
        check_number("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1, **_ERR)
        if self.seed is not None:
            # seed + i (output i of n) must stay a signed 64-bit integer on the wire
            check_int("seed", self.seed, lo=INT64_MIN, hi=INT64_MAX - (self.n - 1),
                      hint=f"None or an integer in [-2**63, 2**63 - n] (n={self.n}, so seed + i fits 64 bits)",
                      **_ERR)
        if self.max_tokens is not None:
            check_int("max_tokens", self.max_tokens, lo=1, hi=WIRE_INT_MAX, hint=f"None or in [1, {WIRE_INT_MAX}]",
                      **_ERR)
        check_int("min_tokens", self.min_tokens, lo=0, hi=WIRE_INT_MAX, **_ERR)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}",
                                      "min_tokens", self.min_tokens)
        for name in ("presence_penalty", "frequency_penalty"):
            check_number(name, getattr(self, name), "in [-2, 2]", lambda v: -2 <= v <= 2, **_ERR)
        check_number("repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0, **_ERR)
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, lo=0, hint="None or an integer >= 0", **_ERR)
        if self.timeout is not None:
            check_number("timeout", self.timeout, "> 0 seconds (or None: no deadline)", lambda v: v > 0, **_ERR)
        if self.prompt_logprobs is not None:
            check_int("prompt_logprobs", self.prompt_logprobs, lo=0, hint="None or an integer >= 0", **_ERR)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            check_bool(name, getattr(self, name), type_err=SamplingParamsTypeError)
        self._stop_list = _normalize_stop(self.stop)
        self.stop_token_ids = _normalize_stop_token_ids(self.stop_token_ids)

    @classmethod
    def from_dict(cls, values: dict) -> SamplingParams:
        """vLLM / OpenAI-style keyword dict -> SamplingParams; an unknown key is an UnknownArgumentError."""
        if not isinstance(values, dict):
            raise SamplingParamsTypeError(f"sampling_params={show(values)} must be a SamplingParams or a dict, "
                                          f"not {type(values).__name__}", "sampling_params", values)
        return cls(**values)

    @property
    def stop_strings(self) -> list[str]:
        """`stop` as a list (empty when None)."""
        return self._stop_list

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def to_wire(self, eos_token_ids: list[int], index: int = 0) -> SeqSampling:
        """What the sampler of output sequence `index` needs.

        While fewer than min_tokens outputs exist, the sampler masks every token that would
        stop the sequence: the stop_token_ids, and EOS unless ignore_eos (then EOS does not stop
        it, so there is nothing to protect). Greedy sampling ignores top_p/top_k/min_p.
        """
        suppress: list[int] = []
        if self.min_tokens > 0:
            suppress = list(dict.fromkeys(list(self.stop_token_ids) + ([] if self.ignore_eos else list(eos_token_ids))))
        greedy = self.greedy
        return SeqSampling(
            temperature=0.0 if greedy else float(self.temperature),
            top_p=1.0 if greedy else float(self.top_p),
            top_k=-1 if greedy or self.top_k in (0, -1) else int(self.top_k),
            min_p=0.0 if greedy else float(self.min_p),
            seed=None if self.seed is None else int(self.seed) + index,
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
            logprobs=self.logprobs,
            # only the first output sequence computes (and reports) the prompt's logprobs
            prompt_logprobs=self.prompt_logprobs if index == 0 else None,
            min_tokens=int(self.min_tokens),
            suppress_token_ids=suppress,
        )


def _normalize_stop(stop) -> list[str]:
    """None, a str, or a list/tuple of non-empty str (a dict or set is an error: its order or keys would be used)."""
    if stop is None:
        return []
    if not isinstance(stop, (str, list, tuple)):
        raise SamplingParamsTypeError(f"stop={show(stop)} must be a str or a list of str, not {type(stop).__name__}",
                                      "stop", stop)
    items = [stop] if isinstance(stop, str) else list(stop)
    for s in items:
        if not isinstance(s, str) or s == "":
            cls = SamplingParamsError if s == "" else SamplingParamsTypeError
            raise cls(f"stop={show(stop)} contains {show(s)}; every stop string must be a non-empty str", "stop", stop)
        _check_encodable("stop", s)
    return items


def _normalize_stop_token_ids(ids) -> list[int]:
    """None, an int, or a list/tuple of non-negative ints (not floats, not strings, not bools)."""
    if ids is None:
        return []
    if isinstance(ids, int) and not isinstance(ids, bool):
        ids = [ids]
    if not isinstance(ids, (list, tuple)):
        raise SamplingParamsTypeError(f"stop_token_ids={show(ids)} must be a list of token ids, "
                                      f"not {type(ids).__name__}", "stop_token_ids", ids)
    for t in ids:
        check_int("stop_token_ids", t, lo=0, hi=INT64_MAX,
                  hint=f">= 0 (each entry of {show(ids)})", **_ERR)
    return list(ids)


def _check_encodable(name: str, text: str) -> None:
    """A lone surrogate (e.g. from a bad JSON escape) cannot be tokenized or matched: say so here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SamplingParamsError(f"{name}={show(text)} is not valid Unicode text ({e.reason} at "
                                  f"position {e.start}); remove the lone surrogate", name, text) from None


_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams) if f.init)
_dataclass_init = SamplingParams.__init__


def _init(self, *args, **kwargs) -> None:
    reject_unknown(kwargs, _FIELDS, "SamplingParams")
    _dataclass_init(self, *args, **kwargs)


_init.__doc__ = _dataclass_init.__doc__
SamplingParams.__init__ = _init   # a misspelt keyword names the closest field, not just Python's TypeError
