"""Continuous batching for one replica: which sequences compute which tokens this step.

Every `schedule()` builds one step under two budgets, `max_num_seqs` running sequences and
`max_num_batched_tokens` computed tokens, in this order:

1. decodes: every running sequence with one token to compute, oldest first. If a sequence
   needs a new KV block and none is free, the youngest running sequence is preempted (its
   blocks freed, back to the front of the waiting queue, recomputed later) until it fits.
2. prefill chunks of running sequences that are still prefilling, oldest first, with what is
   left of the token budget (chunked prefill: a long prompt takes several steps).
3. admissions from the waiting queue, first come first served, while blocks, sequence slots
   and tokens remain (none in a step that had to preempt). A new sequence gets blocks for all
   its tokens at once; the prefix cache may cover its leading full blocks.

The scheduled sequences are then split into up to `pipeline_parallel_size` micro-batches with
balanced token counts, and encoded for the ranks: a sequence the ranks have not seen (new, or
resumed after preemption under a fresh seq id) as a `NewSequence`, the others as a diff.

Example (max_num_batched_tokens=8, block_size=4): A decoding, B with a 20-token prompt waiting
    step 1: A computes 1 token, B is admitted and computes tokens [0, 7)
    step 2: A 1 token, B [7, 14)
    step 3: A 1 token, B [14, 20) and samples its first token
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from scheduler.block_manager import BlockManager
from scheduler.config import EngineConfig
from scheduler.request import Sequence, SequenceStatus
from scheduler.wire import NewSequence, ScheduledSequence, StepInput, StepOutput


@dataclass(slots=True)
class ScheduledItem:
    """One sequence's work in this step: compute `num_new` tokens, then sample if `sample`."""

    seq: Sequence
    num_new: int
    sample: bool


@dataclass
class MicroBatch:
    """The wire form of one micro-batch plus the sequences behind it (aligned with `scheduled`)."""

    items: list[ScheduledItem] = field(default_factory=list)
    new_sequences: list[NewSequence] = field(default_factory=list)
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(i.num_new for i in self.items)

    def to_step_input(self, step_id: int, replica: int, index: int) -> StepInput:
        return StepInput(step_id=step_id, replica=replica, micro_batch=index,
                         new_sequences=self.new_sequences, scheduled=self.scheduled,
                         finished_seq_ids=self.finished_seq_ids)


@dataclass
class SchedulerOutput:
    micro_batches: list[MicroBatch] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(mb.num_tokens for mb in self.micro_batches)

    @property
    def items(self) -> list[ScheduledItem]:
        return [i for mb in self.micro_batches for i in mb.items]


@dataclass(slots=True)
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None


class Scheduler:
    """Continuous batching, chunked prefill and preemption by recompute for ONE replica."""

    micro_batches_per_stage = 1   # micro-batches per step = P x this (benchmarks/bench_microbatches.py varies it)

    def __init__(self, config: EngineConfig, num_kv_blocks: int) -> None:
        self.config = config
        self.block_manager = BlockManager(num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []          # sorted by (order, index): oldest first
        self.num_preemptions = 0
        self._dropped_seq_ids: list[int] = []      # the ranks must forget these at the next step

    # -- queue ---------------------------------------------------------------------------

    def add_sequence(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """End a sequence (stop, length or abort): free its blocks and tell the ranks to forget it."""
        assert status.finished
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if seq.on_ranks():
            self._dropped_seq_ids.append(seq.seq_id)
        seq.status = status
        seq.finish_reason = status.value

    def recompute_all(self) -> None:
        """Preempt every running sequence (e.g. after the ranks were rebuilt and lost their cache)."""
        for seq in reversed(list(self.running)):
            self._preempt(seq)

    def forget_ranks(self) -> None:
        """The replica's ranks were rebuilt with an empty KV cache: recompute every running sequence
        from its prompt + the tokens it already produced (those stay, so a stream goes on where it
        was), forget the prefix cache (its blocks were on the dead ranks) and the ids the old ranks
        were to drop. Not counted as preemptions."""
        preemptions = self.num_preemptions
        self.recompute_all()
        self.num_preemptions = preemptions
        self.block_manager.reset_prefix_cache()
        self._dropped_seq_ids = []

    def release(self, request_id: str) -> list[Sequence]:
        """Take a request's sequences off this replica's queue, to move the request to another replica
        (this one is being rebuilt). [] if any of them runs here: only a request that is wholly
        waiting holds no blocks and nothing on the ranks, so only it can move."""
        if any(s.request_id == request_id for s in self.running):
            return []
        seqs = [s for s in self.waiting if s.request_id == request_id]
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        return seqs

    def adopt(self, seqs: list[Sequence]) -> None:
        """Queue sequences released by another replica, each among the waiting ones by age (the
        queue's order is otherwise kept): they recompute from their tokens as after a preemption."""
        for seq in seqs:
            assert seq.status == SequenceStatus.WAITING and not seq.on_ranks(), seq
            i = next((i for i, w in enumerate(self.waiting) if _age(w) > _age(seq)), len(self.waiting))
            self.waiting.insert(i, seq)

    # -- one step ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        items: list[ScheduledItem] = []
        preempted_before = self.num_preemptions
        budget = self._schedule_decodes(items, budget)
        budget = self._schedule_running_prefills(items, budget)
        if self.num_preemptions == preempted_before:
            self._admit_waiting(items, budget)
        out = SchedulerOutput(self._split(items), self.num_preemptions - preempted_before)
        self._encode(out)
        return out

    def _schedule_decodes(self, items: list[ScheduledItem], budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.is_prefilling:
                i += 1
                continue
            while not self.block_manager.can_append(seq):
                victim = self.running[-1]             # the youngest; never one scheduled already
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break                                 # seq was the youngest: nothing after it
            self.block_manager.append_slots(seq)
            items.append(ScheduledItem(seq, 1, True))
            budget -= 1
            i += 1
        return budget

    def _schedule_running_prefills(self, items: list[ScheduledItem], budget: int) -> int:
        for seq in self.running:
            if budget == 0:
                break
            if seq.is_prefilling:
                budget -= self._schedule_chunk(seq, items, budget)
        return budget

    def _admit_waiting(self, items: list[ScheduledItem], budget: int) -> None:
        blocked: list[Sequence] = []                  # n > 1 siblings waiting for the shared prompt
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self._waits_for_sibling(seq):
                blocked.append(self.waiting.popleft())
                continue
            if not self.block_manager.allocate(seq):
                break                                 # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_age)
            budget -= self._schedule_chunk(seq, items, budget)
        self.waiting.extendleft(reversed(blocked))

    def _schedule_chunk(self, seq: Sequence, items: list[ScheduledItem], budget: int) -> int:
        remaining = seq.num_tokens - seq.num_computed_tokens
        n = min(remaining, budget)
        items.append(ScheduledItem(seq, n, n == remaining))
        return n

    @staticmethod
    def _waits_for_sibling(seq: Sequence) -> bool:
        """n > 1: wait until the first sibling computed the prompt, then share its cached blocks."""
        leader = seq.wait_for
        if leader is None:
            return False
        if leader.is_finished or leader.num_computed_tokens >= leader.num_prompt_tokens:
            seq.wait_for = None
            return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: free everything; the sequence restarts from its tokens later."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        on_ranks = seq.on_ranks()
        old_id = seq.reset_for_recompute()
        if on_ranks:
            self._dropped_seq_ids.append(old_id)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- micro-batches and the wire -------------------------------------------------------

    def _split(self, items: list[ScheduledItem]) -> list[MicroBatch]:
        """Up to P micro-batches with balanced token counts (largest first into the lightest)."""
        k = min(self.config.pipeline_parallel_size * self.micro_batches_per_stage, len(items))
        groups: list[list[int]] = [[] for _ in range(k)]
        loads = [0] * k
        for j in sorted(range(len(items)), key=lambda j: -items[j].num_new):
            g = loads.index(min(loads))
            groups[g].append(j)
            loads[g] += items[j].num_new
        return [MicroBatch(items=[items[j] for j in sorted(g)]) for g in groups]

    def _encode(self, out: SchedulerOutput) -> None:
        """Fill the wire fields: NewSequence for sequences the ranks lack, a diff for the others."""
        for mb in out.micro_batches:
            for item in mb.items:
                seq = item.seq
                if not seq.on_ranks():
                    mb.new_sequences.append(NewSequence(seq.seq_id, seq.token_ids, seq.num_prompt_tokens,
                                                        list(seq.block_table), seq.sampling))
                    appended, new_blocks = [], []
                else:
                    appended = seq.token_slice(seq.sent_num_tokens)
                    new_blocks = seq.block_table[seq.sent_num_blocks:]
                seq.sent_num_tokens = seq.num_tokens
                seq.sent_num_blocks = len(seq.block_table)
                mb.scheduled.append(ScheduledSequence(seq.seq_id, seq.num_computed_tokens, item.num_new,
                                                      item.sample, appended, new_blocks))
        if out.micro_batches:
            out.micro_batches[0].finished_seq_ids = self._dropped_seq_ids
            self._dropped_seq_ids = []

    # -- results -------------------------------------------------------------------------

    def update(self, out: SchedulerOutput, results: list[StepOutput]) -> list[SampledToken]:
        """Advance computed counts, cache full blocks, and return the sampled tokens (not yet appended)."""
        if len(results) != len(out.micro_batches):
            raise RuntimeError(f"executor returned {len(results)} outputs for {len(out.micro_batches)} micro-batches")
        sampled: list[SampledToken] = []
        for mb, res in zip(out.micro_batches, results, strict=True):
            tops = res.top_logprobs or [None] * len(res.seq_ids)
            rows = zip(res.seq_ids, res.token_ids, res.logprobs, tops, strict=True)
            by_id = {sid: (t, lp, top) for sid, t, lp, top in rows}
            for item in mb.items:
                seq = item.seq
                if seq.is_finished:   # aborted or timed out while in flight (pipelined engine)
                    continue
                seq.num_computed_tokens += item.num_new
                self.block_manager.cache_computed_blocks(seq)
                if item.sample:
                    if seq.seq_id not in by_id:
                        raise RuntimeError(f"step output of micro-batch {res.micro_batch} lacks seq {seq.seq_id}")
                    t, lp, top = by_id[seq.seq_id]
                    sampled.append(SampledToken(seq, int(t), float(lp), top))
        return sampled


def _age(seq: Sequence) -> tuple[int, int]:
    return (seq.order, seq.index)
