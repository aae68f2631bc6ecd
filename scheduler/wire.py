"""Per-step messages between the scheduler and the ranks, with an explicit msgpack codec.

A `StepInput` names one micro-batch of one replica. Sequences a rank has not seen (new, or
resumed after preemption or a worker rebuild) arrive in full as `NewSequence`; sequences it
already caches arrive as a diff in `ScheduledSequence` (the tokens appended since the last
step and the blocks allocated since then). Workers keep only that cache, which the scheduler
can always rebuild by sending every sequence again as new.

Nothing here is pickled: `encode_*` produce msgpack bytes of plain lists and numbers, and
`decode_*` check the version field first so a mismatched worker fails loudly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

WIRE_VERSION = 1


class WireVersionError(RuntimeError):
    """A message was produced by a different wire version than this process speaks."""


@dataclass(slots=True)
class SeqSampling:
    """What the sampler needs about one sequence (derived from `SamplingParams`)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1          # -1: no limit
    min_p: float = 0.0
    seed: int | None = None  # None: the replica's shared generator
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None      # top-k logprobs to return besides the sampled token's
    min_tokens: int = 0
    suppress_token_ids: list[int] = field(default_factory=list)  # masked while fewer than min_tokens outputs
    prompt_logprobs: int | None = None   # top-k logprobs per prompt position besides the actual token's

    def to_list(self) -> list:
        return [self.temperature, self.top_p, self.top_k, self.min_p, self.seed,
                self.presence_penalty, self.frequency_penalty, self.repetition_penalty,
                self.logprobs, self.min_tokens, list(self.suppress_token_ids), self.prompt_logprobs]

    @classmethod
    def from_list(cls, v: list) -> SeqSampling:
        return cls(*v)


@dataclass(slots=True)
class NewSequence:
    """A sequence the rank has not cached yet: its whole state."""

    seq_id: int
    token_ids: list[int]       # prompt + every output token so far (a resumed sequence recomputes them)
    num_prompt_tokens: int     # penalties treat token_ids[num_prompt_tokens:] as outputs
    block_ids: list[int]       # the blocks it owns now, in order
    sampling: SeqSampling

    def to_list(self) -> list:
        return [self.seq_id, self.token_ids, self.num_prompt_tokens, self.block_ids, self.sampling.to_list()]

    @classmethod
    def from_list(cls, v: list) -> NewSequence:
        return cls(v[0], v[1], v[2], v[3], SeqSampling.from_list(v[4]))


@dataclass(slots=True)
class ScheduledSequence:
    """One sequence's work in this step.

    The rank computes tokens [num_computed, num_computed + num_new) of the sequence, writing
    their K/V into its blocks, and samples a next token only if `sample` is set (a non-final
    prefill chunk does not sample).
    """

    seq_id: int
    num_computed: int                 # tokens whose K/V are already in the cache
    num_new: int                      # tokens to compute now (prefill chunk or 1 for decode)
    sample: bool
    appended_token_ids: list[int] = field(default_factory=list)  # tokens added since the rank last saw it
    new_block_ids: list[int] = field(default_factory=list)       # blocks added since the rank last saw it

    def to_list(self) -> list:
        return [self.seq_id, self.num_computed, self.num_new, self.sample,
                self.appended_token_ids, self.new_block_ids]

    @classmethod
    def from_list(cls, v: list) -> ScheduledSequence:
        return cls(*v)


@dataclass(slots=True)
class StepInput:
    """One micro-batch for one replica. New sequences are registered before `scheduled` runs."""

    step_id: int
    replica: int = 0
    micro_batch: int = 0
    new_sequences: list[NewSequence] = field(default_factory=list)
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # forget these (finished, aborted, preempted)
    version: int = WIRE_VERSION

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)


@dataclass(slots=True)
class StepOutput:
    """What the last stage sampled for one micro-batch, in the order of its sampled sequences."""

    step_id: int
    replica: int = 0
    micro_batch: int = 0
    seq_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)           # log p(sampled token), raw model distribution
    top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)  # per seq, if requested
    # prompt logprobs of this step's prefill chunks: [seq_id, first position, [[actual token's logprob,
    # [[id, logprob], ...top-k]] per position]] (sharding.prompt_logprobs)
    prompt_logprobs: list[list] = field(default_factory=list)
    version: int = WIRE_VERSION


def encode_step_input(s: StepInput) -> bytes:
    return msgpack.packb([s.version, s.step_id, s.replica, s.micro_batch,
                          [n.to_list() for n in s.new_sequences],
                          [x.to_list() for x in s.scheduled],
                          s.finished_seq_ids], use_bin_type=True)


def decode_step_input(data: bytes) -> StepInput:
    v = msgpack.unpackb(data, raw=False, strict_map_key=False)
    _check_version(v[0], "StepInput")
    return StepInput(step_id=v[1], replica=v[2], micro_batch=v[3],
                     new_sequences=[NewSequence.from_list(n) for n in v[4]],
                     scheduled=[ScheduledSequence.from_list(x) for x in v[5]],
                     finished_seq_ids=v[6], version=v[0])


def encode_step_output(s: StepOutput) -> bytes:
    top = [None if t is None else [[int(i), float(p)] for i, p in t] for t in s.top_logprobs]
    return msgpack.packb([s.version, s.step_id, s.replica, s.micro_batch, s.seq_ids, s.token_ids,
                          s.logprobs, top, s.prompt_logprobs], use_bin_type=True)


def decode_step_output(data: bytes) -> StepOutput:
    v = msgpack.unpackb(data, raw=False, strict_map_key=False)
    _check_version(v[0], "StepOutput")
    top = [None if t is None else [(int(i), float(p)) for i, p in t] for t in v[7]]
    return StepOutput(step_id=v[1], replica=v[2], micro_batch=v[3], seq_ids=v[4], token_ids=v[5],
                      logprobs=v[6], top_logprobs=top, prompt_logprobs=v[8], version=v[0])


def _check_version(version: int, what: str) -> None:
    if version != WIRE_VERSION:
        raise WireVersionError(f"{what} has wire version {version}, this process speaks {WIRE_VERSION}; "
                               "run the same Shardline version on every node")
