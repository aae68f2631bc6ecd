"""Requests, the state of each output sequence, and the outputs handed back (vLLM field names).

A `Request` owns `params.n` `Sequence`s. A sequence's `seq_id` is the name the ranks know it by;
it changes when the sequence is preempted (the ranks drop the old id and get the new one as a
`NewSequence`), while `(request_id, index)` names the output for the user.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from scheduler.sampling_params import SamplingParams
from scheduler.wire import SeqSampling

_seq_ids = itertools.count()


def next_seq_id() -> int:
    """A process-wide unique sequence id (never reused, so a rank can never confuse two)."""
    return next(_seq_ids)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"          # queued (new, or preempted and waiting to recompute)
    RUNNING = "running"          # owns KV blocks and is scheduled every step
    FINISHED_STOPPED = "stop"    # EOS, stop token or stop string
    FINISHED_LENGTH = "length"   # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"   # abort_request
    FINISHED_TIMEOUT = "timeout"  # SamplingParams.timeout passed before it finished

    @property
    def finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


@dataclass(eq=False)
class Sequence:
    """One output sequence: its tokens, its KV blocks and what the ranks already know about it."""

    request_id: str
    index: int                          # position in RequestOutput.outputs
    prompt_token_ids: list[int]
    sampling: SeqSampling               # what the sampler needs (from SamplingParams.to_wire)
    arrival: float = 0.0
    order: int = 0                      # FCFS rank: admission, preemption and micro-batch order
    seq_id: int = field(default_factory=next_seq_id)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0        # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the leading full, computed blocks
    num_cached_tokens: int = 0          # prompt tokens served by the prefix cache at the last admission
    output_logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    wait_for: Sequence | None = None    # n > 1: wait until this sibling has computed the prompt
    # what the ranks know (diff encoding); sent_num_tokens == 0 means "send as NewSequence"
    sent_num_tokens: int = 0
    sent_num_blocks: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int | None = None) -> list[int]:
        """token_ids[start:end] without building the whole list."""
        end = self.num_tokens if end is None else end
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def is_prefilling(self) -> bool:
        """More than the last token still needs computing (a prompt, or a resumed sequence)."""
        return self.num_tokens - self.num_computed_tokens > 1

    def on_ranks(self) -> bool:
        return self.sent_num_tokens > 0

    def reset_for_recompute(self) -> int:
        """Forget the KV state (preemption): returns the old seq id; the sequence gets a new one."""
        old = self.seq_id
        self.seq_id = next_seq_id()
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table = []
        self.sent_num_tokens = 0
        self.sent_num_blocks = 0
        return old


@dataclass(eq=False)
class Request:
    """One call to add_request: a prompt, its parameters and its n sequences."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float
    seqs: list[Sequence] = field(default_factory=list)
    replica: int = 0
    deadline: float | None = None       # time.monotonic() after which it ends with "timeout"
    prompt_logprobs: list[dict[int, float] | None] | None = None   # scheduler.prompt_logprobs

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def waiting(self) -> bool:
        """Queued, not yet running: no sequence has (or, after a preemption, still has) KV state."""
        return all(s.status is SequenceStatus.WAITING for s in self.seqs)


@dataclass
class CompletionOutput:
    """One output sequence of a request (vLLM's `CompletionOutput`)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None   # per output token: {token_id: logprob}, sampled token + top-k
    finish_reason: str | None = None          # "stop", "length", "abort", "timeout" or None while running
    stop_reason: int | str | None = None      # the stop token id or stop string that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Everything produced for one request so far (vLLM's `RequestOutput`, cumulative)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0                # prompt tokens served by the prefix cache
    # with SamplingParams.prompt_logprobs: per prompt token {token_id: logprob} (the token + top-k), first None
    prompt_logprobs: list[dict[int, float] | None] | None = None
