"""Beam search over any engine driver, matching Hugging Face `generate(num_beams=k, do_sample=False)`.

Driver-agnostic: `run` takes a batch of (token_ids, SamplingParams) and returns one finished
`RequestOutput` per item, in order. Each round asks for ONE greedy token with
`logprobs=K` for every live beam of every prompt (the prefix cache makes the repeated
prompts cheap), where K = max(2, 1 + number of EOS ids) * beam_width as in HF.

Semantics matched (transformers 5.x `GenerationMixin._beam_search`, defaults
`length_penalty=1.0`, `early_stopping=False`, `num_return_sequences=1`):
- candidates: the K best (beam score + token logprob) over all live beams' tokens; the first
  round has one live beam (HF gives beams 1.. a score of -1e9);
- a candidate "hits a stopping criterion" if its token is EOS (unless ignore_eos) or it
  reaches max_tokens generated tokens;
- live beams for the next round: the beam_width best candidates that did not hit one;
- finished beams: among the beam_width best candidates (not all K), those that hit one
  join the finished set with score = sum(logprobs) / (generated length ** length_penalty)
  (the length counts the EOS token); the finished set keeps the beam_width best scores;
  no beam joins once the early-stop heuristic below has fired;
- early-stop heuristic (early_stopping=False): after each round with g generated tokens,
  search stops for a prompt once the finished set is full and best_live_score / g**length_penalty
  is not above the worst finished score; it also stops when every candidate hit a criterion;
- result: the finished beams, best score first (BeamSearchOutput.sequences[0] is what HF returns).
Ties between equal scores are broken by beam order then token id (torch.topk leaves them
unspecified). Only temperature=0 is supported: the sampler's logprobs are the raw model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler.checks import check_bool, check_int, check_number
from scheduler.errors import SamplingParamsError, SamplingParamsTypeError, reject_unknown
from scheduler.request import RequestOutput
from scheduler.sampling_params import SamplingParams

_ERR = {"err": SamplingParamsError, "type_err": SamplingParamsTypeError}

RunBatch = Callable[[list[tuple[list[int], SamplingParams]]], list[RequestOutput]]


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's `BeamSearchParams`."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_int("beam_width", self.beam_width, lo=1, **_ERR)
        check_int("max_tokens", self.max_tokens, lo=1, hi=2**31 - 1, **_ERR)
        check_bool("ignore_eos", self.ignore_eos, type_err=SamplingParamsTypeError)
        check_number("temperature", self.temperature, "equal to 0 (beam search is HF do_sample=False)",
                     lambda v: v == 0, **_ERR)
        check_number("length_penalty", self.length_penalty, "(any finite number; HF's default 1.0)",
                     lambda v: True, **_ERR)

    def logprobs_per_step(self, num_eos: int) -> int:
        """K: top logprobs asked per beam per round (HF: max(2, 1 + number of EOS ids) x beam_width)."""
        return max(2, 1 + (0 if self.ignore_eos else num_eos)) * self.beam_width


@dataclass
class BeamSearchSequence:
    tokens: list[int]              # prompt + generated tokens (as vLLM)
    logprobs: list[float]          # log p of each generated token
    cum_logprob: float
    score: float                   # HF: cum_logprob / len(generated) ** length_penalty
    num_prompt_tokens: int
    finish_reason: str = "length"  # "stop" (EOS) or "length"
    text: str | None = None        # generated text, if a decoder was given

    @property
    def output_token_ids(self) -> list[int]:
        return self.tokens[self.num_prompt_tokens:]


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]   # best first


@dataclass
class _Beam:
    tokens: list[int]
    logprobs: list[float]
    score: float


@dataclass
class _PromptState:
    prompt: list[int]
    max_new: int
    running: list[_Beam]
    finished: list[BeamSearchSequence] = field(default_factory=list)
    generated: int = 0
    improvable: bool = True        # HF: is_early_stop_heuristic_unsatisfied
    done: bool = False


def beam_search(run: RunBatch, prompts: list[list[int]], params: BeamSearchParams, eos_token_ids: list[int],
                max_model_len: int | None = None,
                decode: Callable[[list[int]], str] | None = None) -> list[BeamSearchOutput]:
    eos = set() if params.ignore_eos else set(eos_token_ids)
    k = params.logprobs_per_step(len(eos))
    states = []
    for p in prompts:
        max_new = params.max_tokens if max_model_len is None else min(params.max_tokens, max_model_len - len(p))
        states.append(_PromptState(list(p), max_new, [_Beam([], [], 0.0)]))
    step_params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, ignore_eos=True)
    while True:
        live = [s for s in states if not s.done]
        if not live:
            break
        batch = [(s.prompt + b.tokens, step_params) for s in live for b in s.running]
        outs = run(batch)
        pos = 0
        for s in live:
            tops = [outs[pos + j].outputs[0].logprobs[0] for j in range(len(s.running))]
            pos += len(s.running)
            _advance(s, tops, k, eos, params)
    results = []
    for s in states:
        seqs = sorted(s.finished, key=lambda f: -f.score)
        for f in seqs:
            if decode is not None:
                f.text = decode(f.output_token_ids)
        results.append(BeamSearchOutput(seqs))
    return results


def _advance(s: _PromptState, tops: list[dict[int, float]], k: int, eos: set[int], params: BeamSearchParams) -> None:
    """One HF beam-search iteration for one prompt, given each live beam's top-k next-token logprobs."""
    bw, lp_pow = params.beam_width, params.length_penalty
    cands = [(beam.score + lp, b, tok, lp) for b, (beam, top) in enumerate(zip(s.running, tops, strict=True))
             for tok, lp in top.items()]
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    cands = cands[:k]
    g = s.generated + 1
    hits = [tok in eos or g >= s.max_new for _, _, tok, _ in cands]

    if s.improvable:
        for j, (score, b, tok, lp) in enumerate(cands[:bw]):
            if hits[j]:
                beam = s.running[b]
                s.finished.append(BeamSearchSequence(
                    tokens=s.prompt + beam.tokens + [tok], logprobs=beam.logprobs + [lp], cum_logprob=score,
                    score=score / (g ** lp_pow), num_prompt_tokens=len(s.prompt),
                    finish_reason="stop" if tok in eos else "length"))
        s.finished.sort(key=lambda f: -f.score)     # stable: earlier finishers win ties, as HF's merge
        del s.finished[bw:]

    new_running = []
    for j, (score, b, tok, lp) in enumerate(cands):
        if not hits[j] and len(new_running) < bw:
            beam = s.running[b]
            new_running.append(_Beam(beam.tokens + [tok], beam.logprobs + [lp], score))
    s.running = new_running
    s.generated = g

    best_live = new_running[0].score / (g ** lp_pow) if new_running else -1.0e9
    worst_finished = s.finished[-1].score if len(s.finished) == bw else -1.0e9
    s.improvable = s.improvable and best_live > worst_finished
    s.done = not s.improvable or all(hits) or not new_running


_BEAM_FIELDS = ("beam_width", "max_tokens", "ignore_eos", "temperature", "length_penalty")
_beam_init = BeamSearchParams.__init__


def _init(self, *args, **kwargs) -> None:
    reject_unknown(kwargs, _BEAM_FIELDS, "BeamSearchParams")
    _beam_init(self, *args, **kwargs)


BeamSearchParams.__init__ = _init   # a misspelt keyword names the closest field
