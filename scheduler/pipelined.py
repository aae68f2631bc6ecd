"""Pipeline overlap across steps: P micro-batch streams ("virtual engines") always in flight.

`LLMEngine.step()` fills and drains the pipeline every step: it splits the batch into P
micro-batches, sends them all, and waits for all of them before scheduling again, so with P
stages every stage idles part of each step (stage 0 while the last stage finishes, both while
the driver schedules). `PipelinedEngine` instead splits each replica's sequences into P lanes,
each a `Scheduler` of its own (its own waiting and running queues, 1/P of `max_num_seqs`)
sharing the replica's one `BlockManager`, and keeps one micro-batch per lane in flight:

    step k:   collect lane 0's micro-batch ─ process ─ return outputs
    step k+1: schedule + submit lane 0 again   (enters stage 0 while lane 1 is in stage 1)
              collect lane 1 ─ process ─ return outputs

Each `step()` schedules and submits every idle lane of every ready replica, then collects the
oldest micro-batch in flight and returns its outputs. The executor must offer
`submit(steps) -> handle` (returns at once) and `collect(handle)` (waits with the step
deadline; raises `ReplicasFailedError` like `execute`). The ranks see one replica's
micro-batches in submission order (Ray runs each actor's calls in order), so a block freed
while its old owner is still in flight can be given to a later micro-batch: every rank runs
the older one first.

What can happen to a lane's sequences while it is in flight, and why it is safe:
- abort / timeout: `Scheduler.finish` frees the blocks at once; when the results come back,
  finished sequences are skipped (`Scheduler.update`, `prompt_logprobs.record`);
- preemption: a lane only preempts its own sequences, and is never scheduled while in flight;
- a failed replica: every lane of it is re-queued for recompute and its other in-flight
  micro-batches are dropped uncollected (their ranks are being killed and rebuilt).

A request's n sequences stay in one lane; a new request goes to the least loaded lane of the
least loaded ready replica (the engine's `_least_loaded` over lanes). The scheduler's token
budget applies per lane (one micro-batch per lane step).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from typing import Any, Protocol, runtime_checkable

from scheduler.engine import READY_WAIT_S, LLMEngine
from scheduler.executor import ReplicaFailure, ReplicasFailedError
from scheduler.request import RequestOutput
from scheduler.scheduler import Scheduler, SchedulerOutput
from scheduler.wire import StepInput, StepOutput

logger = logging.getLogger(__name__)


@runtime_checkable
class AsyncExecutor(Protocol):
    """An `Executor` that can also keep micro-batches in flight across calls."""

    def submit(self, steps: list[StepInput]) -> Any:
        """Send micro-batches (of ready replicas) and return a handle at once."""
        ...

    def collect(self, handle: Any) -> list[StepOutput]:
        """Wait (step deadline from now) for a handle's outputs; `ReplicasFailedError` as `execute`."""
        ...


def make_engine(config, executor, tokenizer, eos_token_ids: list[int], max_model_len: int) -> LLMEngine:
    """`PipelinedEngine` when there are stages to overlap (P > 1, `pipeline_overlap`, an
    `AsyncExecutor`), else the fill-and-drain `LLMEngine`."""
    pipelined = (config.pipeline_parallel_size > 1 and config.pipeline_overlap and config.max_num_seqs > 1
                 and isinstance(executor, AsyncExecutor))
    cls = PipelinedEngine if pipelined else LLMEngine
    return cls(config, executor, tokenizer, eos_token_ids, max_model_len)


@dataclasses.dataclass
class _Flight:
    lane: int                  # index into `schedulers`
    plan: SchedulerOutput
    handle: Any


class PipelinedEngine(LLMEngine):
    """`LLMEngine` with P lanes per replica, one micro-batch of each in flight (see the module doc)."""

    def __init__(self, config, executor, tokenizer, eos_token_ids: list[int], max_model_len: int) -> None:
        super().__init__(config, executor, tokenizer, eos_token_ids, max_model_len)
        p = min(config.pipeline_parallel_size, config.max_num_seqs)
        self.lanes_per_replica = p
        self.schedulers = []
        for _ in range(executor.num_replicas):   # lane v = replica * p + i
            shared = None
            for i in range(p):
                # the lanes' max_num_seqs add up to the replica's; one micro-batch per lane step
                lane_cfg = dataclasses.replace(config, pipeline_parallel_size=1,
                                               max_num_seqs=config.max_num_seqs // p + (i < config.max_num_seqs % p))
                sched = Scheduler(lane_cfg, executor.num_kv_blocks)
                if shared is None:
                    shared = sched.block_manager
                sched.block_manager = shared
                self.schedulers.append(sched)
        self._flights: deque[_Flight] = deque()    # oldest first

    def _replica_of(self, lane: int) -> int:
        return lane // self.lanes_per_replica

    def _ready_engines(self) -> frozenset[int]:
        ready = self.executor.ready_replicas
        return frozenset(v for v in range(len(self.schedulers)) if self._replica_of(v) in ready)

    def step(self) -> list[RequestOutput]:
        with self._step_lock:
            self._take_recoveries()
            changed = self._apply_inboxes()
            ready = self._ready_engines()
            self._move_from_unready(ready)
            self._submit_idle_lanes(ready)
            if self._flights:
                changed |= self._collect_oldest()
            elif not ready and any(s.has_unfinished() for s in self.schedulers):
                self.executor.wait_ready(READY_WAIT_S)   # every replica is being rebuilt: no busy loop
            return self._outputs(changed)

    def drain(self) -> list[RequestOutput]:
        """Collect every micro-batch in flight without submitting more (a benchmark's round ends
        with an empty pipeline, so nothing runs on the ranks during the next measurement)."""
        with self._step_lock:
            changed: set[str] = set()
            while self._flights:
                changed |= self._collect_oldest()
            return self._outputs(changed)

    def _submit_idle_lanes(self, ready: frozenset[int]) -> None:
        busy = {f.lane for f in self._flights}
        for v in sorted(ready - busy):
            plan = self.schedulers[v].schedule()
            if not plan.micro_batches:
                continue
            replica, index = self._replica_of(v), v % self.lanes_per_replica
            steps = [mb.to_step_input(self._step_id, replica, index) for mb in plan.micro_batches]
            self._step_id += 1
            self._flights.append(_Flight(v, plan, self.executor.submit(steps)))
        self.max_batch_seqs = max(self.max_batch_seqs, sum(len(f.plan.items) for f in self._flights))

    def _collect_oldest(self) -> set[str]:
        flight = self._flights.popleft()
        try:
            results = self.executor.collect(flight.handle)
        except ReplicasFailedError as e:   # the lane's replica died: it and its other lanes recompute
            self._requeue_failed(e.failures)
            self.num_steps += 1
            return set()
        if len(results) != len(flight.plan.micro_batches):
            raise RuntimeError(f"executor returned {len(results)} outputs for {len(flight.plan.micro_batches)} "
                               "steps")
        self.num_steps += 1
        plans = [flight.plan if v == flight.lane else SchedulerOutput() for v in range(len(self.schedulers))]
        return self._process(plans, results)

    def _requeue_failed(self, failures: list[ReplicaFailure]) -> None:
        """Every lane of a failed replica recomputes; its micro-batches still in flight are dropped."""
        lost = {f.replica for f in failures}
        self._flights = deque(f for f in self._flights if self._replica_of(f.lane) not in lost)
        for f in failures:
            lanes = [v for v in range(len(self.schedulers)) if self._replica_of(v) == f.replica]
            n = sum(self.schedulers[v].num_unfinished for v in lanes)
            for v in lanes:
                self.schedulers[v].forget_ranks()
            logger.warning("replica %d failed (%s); rebuilding it; %d unfinished sequences of its %d lanes "
                           "re-queued for recompute", f.replica, f.cause, n, len(lanes))
