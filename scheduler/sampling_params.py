"""Per-request sampling parameters, with vLLM's names and meanings.

Differences from vLLM worth knowing:
- `top_k`: 0 or -1 both mean "no limit" (vLLM accepts both); the wire always carries -1.
- `best_of` and beam search flags are not here: beam search has its own driver
  (`scheduler.beam_search`) and its own `BeamSearchParams`.
- `max_tokens=None` means "until the model's length limit", as in vLLM.
- `cumulative_logprob` is always reported (vLLM v1 reports it only with `logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.wire import SeqSampling

_GREEDY_EPS = 1e-5  # temperatures below this are greedy, as in vLLM


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message names the field, the value and the allowed range."""


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
    presence_penalty: float = 0.0
    """Subtracted from the logits of tokens already in the output, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence in the output, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """HF-style multiplicative penalty over prompt and output tokens; 1 disables it; > 0."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the returned text."""
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int("n", self.n, lo=1)
        _check_range("temperature", self.temperature, ">= 0", lambda v: v >= 0)
        _check_range("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        _check_int("top_k", self.top_k, lo=-1, hint="-1 or 0 to disable, or a positive k")
        _check_range("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=None)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1, hint=">= 1 or None")
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_range(name, getattr(self, name), "in [-2, 2]", lambda v: -2 <= v <= 2)
        _check_range("repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0, hint=">= 0 or None")
        self._stop_list = _normalize_stop(self.stop)
        self.stop_token_ids = _normalize_stop_token_ids(self.stop_token_ids)

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
            min_tokens=int(self.min_tokens),
            suppress_token_ids=suppress,
        )


def _check_int(name: str, value, lo: int | None, hint: str | None = None) -> None:
    allowed = hint or (f">= {lo}" if lo is not None else "an integer")
    if not isinstance(value, int) or isinstance(value, bool):
        raise SamplingParamsError(f"{name}={value!r} must be an integer ({allowed})")
    if lo is not None and value < lo:
        raise SamplingParamsError(f"{name}={value!r} is out of range; allowed: {allowed}")


def _check_range(name: str, value, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingParamsError(f"{name}={value!r} must be a number {allowed}")
    if value != value or not ok(value):  # value != value: NaN
        raise SamplingParamsError(f"{name}={value!r} is out of range; allowed: {allowed}")


def _normalize_stop(stop) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
    for s in items:
        if not isinstance(s, str) or s == "":
            raise SamplingParamsError(f"stop={stop!r} contains {s!r}; every stop string must be a non-empty str")
    return items


def _normalize_stop_token_ids(ids) -> list[int]:
    if ids is None:
        return []
    ids = [ids] if isinstance(ids, int) and not isinstance(ids, bool) else list(ids)
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise SamplingParamsError(f"stop_token_ids contains {t!r}; allowed: non-negative integers")
    return ids
