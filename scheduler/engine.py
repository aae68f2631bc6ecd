"""The engine step loop, written against the `Executor` protocol (no torch, no ray).

One `step()`:
1. apply the requests added and aborted since the last step (any thread may add or abort);
2. `schedule()` every replica's `Scheduler`;
3. build the `StepInput`s of every replica's micro-batches and make ONE `executor.execute` call
   (with P > 1 stages, `scheduler.pipelined.PipelinedEngine` keeps them in flight across steps);
4. append the sampled tokens, detokenize, check stop conditions (EOS unless ignore_eos,
   stop_token_ids, stop strings, max_tokens, max_model_len), free finished sequences;
5. return a cumulative `RequestOutput` for every request that got a token or finished.

Data parallelism: one `Scheduler` per replica; a new request goes to the ready replica with the
fewest unfinished sequences, then the most free KV blocks. All n sequences of a request stay
on one replica.

Recovery: when the executor reports replicas failed (`ReplicasFailedError`: a rank died, raised
or missed its deadline), the other replicas' results of that step are applied as usual and the
failed replicas' sequences go back to the waiting queue to be recomputed from prompt + the
tokens they already produced (kept, so a stream continues with no token repeated); their prefix
cache is forgotten with the old ranks. The executor rebuilds those replicas in the background:
until one is back in `executor.ready_replicas` nothing is scheduled on it, new requests go to
ready replicas, and the waiting requests of a replica that is not ready move to a ready one
(they recompute from their tokens anyway). With no replica ready (DP=1) a step waits for the
rebuild in bounded slices (`READY_WAIT_S`), applying aborts and request timeouts in between.
Each finished rebuild is appended to `recoveries`; a rebuild that failed past the restart
budget raises `EngineDeadError` from the next step.

n > 1 shares the prompt through the prefix cache: sibling 0 is admitted first, the others wait
until its prompt is computed and then reuse its full prompt blocks (each recomputes only the
partial last block, and samples from its own logits with seed + index). Without prefix caching
the siblings compute the prompt independently.

Admission control: with `max_waiting_requests`, a request that would make more requests wait
(queued, not yet running) than that raises `QueueFullError` at once (the caller retries later).
A request with `SamplingParams.timeout` ends with finish_reason "timeout" at the first step
after its deadline, wherever it is (waiting or running); its blocks are freed like an abort's.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

from tokenizers import Tokenizer

from scheduler import prompt_logprobs, validation
from scheduler.config import EngineConfig
from scheduler.detokenizer import IncrementalDetokenizer
from scheduler.errors import InvalidRequestError, InvalidTypeError, PromptTooLongError, QueueFullError, show
from scheduler.executor import Executor, ReplicaFailure, ReplicaRecovery, ReplicasFailedError
from scheduler.request import CompletionOutput, Request, RequestOutput, Sequence, SequenceStatus
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import SampledToken, Scheduler, SchedulerOutput
from scheduler.wire import StepInput

__all__ = ["LLMEngine", "PromptTooLongError"]

logger = logging.getLogger(__name__)

READY_WAIT_S = 0.25   # with no replica ready, how long one step waits for a rebuild (aborts apply between)


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor, tokenizer: Tokenizer,
                 eos_token_ids: list[int], max_model_len: int) -> None:
        self.config = config
        self.executor = executor
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.max_model_len = max_model_len
        self.kv_capacity_tokens = executor.num_kv_blocks * config.block_size
        self.schedulers = [Scheduler(config, executor.num_kv_blocks) for _ in range(executor.num_replicas)]
        self._requests: dict[str, Request] = {}
        self._detok: dict[int, IncrementalDetokenizer] = {}    # id(Sequence) -> its detokenizer
        self._lock = threading.Lock()                           # guards the inboxes below
        self._step_lock = threading.Lock()                      # one step at a time
        self._added: list[Request] = []
        self._aborted: list[str] = []
        self._deadlines: dict[str, float] = {}                  # request id -> time.monotonic() deadline
        self._order = itertools.count()
        self._step_id = 0
        self.num_steps = 0
        self.max_batch_seqs = 0                                 # largest number of sequences in one step
        self.recoveries: list[ReplicaRecovery] = []             # replicas the executor rebuilt, oldest first

    # -- requests ------------------------------------------------------------------------

    @property
    def limits(self) -> validation.RequestLimits:
        """The bounds every request to this engine is checked against (scheduler.validation)."""
        return validation.RequestLimits(
            vocab_size=self.tokenizer.get_vocab_size(with_added_tokens=True), max_model_len=self.max_model_len,
            kv_capacity_tokens=self.kv_capacity_tokens, max_logprobs=self.config.max_logprobs,
            max_n=self.config.max_n, block_size=self.config.block_size)

    def add_request(self, request_id: str, prompt: str | list[int] | dict, params: SamplingParams | dict | None = None,
                    arrival_time: float | None = None, prompt_text: str | None = None) -> None:
        """Queue a request; raises an InvalidRequestError (e.g. PromptTooLongError) at once if it can never run.

        `prompt` is text (tokenized here, with the tokenizer's special tokens), token ids, or a
        {"prompt_token_ids"/"prompt"} dict; `prompt_text` is the text to report for token-id
        prompts (e.g. a rendered chat). Nothing is queued unless everything is valid.
        """
        self.add_requests([self.make_request(request_id, prompt, params, arrival_time, prompt_text)])

    def make_request(self, request_id: str, prompt, params=None, arrival_time: float | None = None,
                     prompt_text: str | None = None) -> Request:
        """Validate one request (scheduler.validation) and build it, without queueing it."""
        if not isinstance(request_id, str):
            raise InvalidTypeError(f"request_id={show(request_id)} must be a str", "request_id", request_id)
        limits = self.limits
        params = validation.check_sampling_params(SamplingParams() if params is None else params, limits)
        text, ids = validation.prompt_token_ids(prompt, self.tokenizer, limits)
        if prompt_text is not None:
            text = validation.check_text(prompt_text)
        deadline = None if params.timeout is None else time.monotonic() + params.timeout
        return Request(request_id, text, ids, params, time.time() if arrival_time is None else arrival_time,
                       deadline=deadline)

    def add_requests(self, requests: list[Request]) -> None:
        """Queue validated requests all together or none of them (atomic admission).

        Raises QueueFullError (nothing queued) if they would make more than max_waiting_requests wait."""
        with self._lock:
            running = set(self._requests) | {r.request_id for r in self._added}
            seen = set()
            for req in requests:
                if req.request_id in running or req.request_id in seen:
                    raise InvalidRequestError(f"request_id {req.request_id!r} is already running", "request_id",
                                              req.request_id)
                seen.add(req.request_id)
            self._check_queue_room(len(requests))
            self._added.extend(requests)
            self._deadlines.update((r.request_id, r.deadline) for r in requests if r.deadline is not None)

    def _check_queue_room(self, incoming: int) -> None:
        """(under self._lock) QueueFullError unless `incoming` more waiting requests fit the bound."""
        limit = self.config.max_waiting_requests
        if limit is None:
            return
        waiting = len(self._added) + sum(1 for r in self._requests.values() if r.waiting)
        if waiting + incoming > limit:
            raise QueueFullError(f"the engine's queue is full: {waiting} requests are waiting to run and "
                                 f"max_waiting_requests={limit}; {incoming} more do not fit. Retry shortly, or "
                                 "raise max_waiting_requests")

    @property
    def num_waiting_requests(self) -> int:
        """Requests queued and not yet running (new, or preempted back to the queue)."""
        with self._lock:
            return len(self._added) + sum(1 for r in self._requests.values() if r.waiting)

    def check_prompt(self, ids: list[int]) -> None:
        """Raise PromptTooLongError / PromptError if these token ids can never run on this engine."""
        validation.check_token_ids(ids, self.limits)

    def abort_request(self, request_id: str) -> None:
        """Abort at the start of the next step (its output then has finish_reason "abort")."""
        with self._lock:
            self._aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._requests or self._added)

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            return len(self._requests) + len(self._added)

    def unfinished_request_ids(self) -> list[str]:
        with self._lock:
            return list(self._requests) + [r.request_id for r in self._added]

    # -- the loop ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        with self._step_lock:
            self._take_recoveries()
            changed = self._apply_inboxes()
            ready = self._ready_engines()
            self._move_from_unready(ready)
            plans = [s.schedule() if r in ready else SchedulerOutput() for r, s in enumerate(self.schedulers)]
            steps: list[StepInput] = []
            for r, plan in enumerate(plans):
                steps += [mb.to_step_input(self._step_id, r, i) for i, mb in enumerate(plan.micro_batches)]
            if steps:
                self.max_batch_seqs = max(self.max_batch_seqs, sum(len(s.scheduled) for s in steps))
                lost: set[int] = set()
                try:
                    results = self.executor.execute(steps)
                except ReplicasFailedError as e:   # other replicas' results of this step stand
                    results, lost = e.outputs, e.replicas
                    self._requeue_failed(e.failures)
                if len(results) != len(steps):
                    raise RuntimeError(f"executor returned {len(results)} outputs for {len(steps)} steps")
                self._step_id += 1
                self.num_steps += 1
                changed |= self._process(plans, results, lost)
            elif not ready and any(s.has_unfinished() for s in self.schedulers):
                self.executor.wait_ready(READY_WAIT_S)   # every replica is being rebuilt: no busy loop
            return self._outputs(changed)

    def _take_recoveries(self) -> None:
        """Log the rebuilds the executor finished (EngineDeadError if one failed past the budget)."""
        for rec in self.executor.take_recoveries():
            self.recoveries.append(rec)
            logger.warning("replica %d rebuilt in %.2f s (restart %d of max_restarts=%d) after: %s", rec.replica,
                           rec.recovery_s, rec.restarts_used, self.config.max_restarts, rec.cause)

    def _requeue_failed(self, failures: list[ReplicaFailure]) -> None:
        """Recovery: the failed replicas' sequences are recomputed from prompt + tokens produced so far."""
        for f in failures:
            sched = self.schedulers[f.replica]
            n = sched.num_unfinished
            sched.forget_ranks()
            logger.warning("replica %d failed (%s); rebuilding it; %d unfinished sequences re-queued for "
                           "recompute", f.replica, f.cause, n)

    def _ready_engines(self) -> frozenset[int]:
        """Indices into `schedulers` that may be scheduled now (one scheduler per ready replica)."""
        return self.executor.ready_replicas

    def _move_from_unready(self, ready: frozenset[int]) -> None:
        """Requests queued on a replica that is being rebuilt move to the least loaded ready replica.

        Such a replica runs nothing (`forget_ranks` re-queued everything), so its requests wait and
        hold no block; a request moves whole (its n sequences share a replica)."""
        if not ready or len(ready) == len(self.schedulers):
            return
        for r, sched in enumerate(self.schedulers):
            if r in ready or not sched.waiting:
                continue
            for rid in dict.fromkeys(seq.request_id for seq in sched.waiting):   # oldest first
                to = self._least_loaded(ready)
                seqs = sched.release(rid)
                if seqs:
                    self.schedulers[to].adopt(seqs)
                    self._requests[rid].replica = to

    def _apply_inboxes(self) -> set[str]:
        with self._lock:
            added, self._added = self._added, []
            aborted, self._aborted = self._aborted, []
            for req in added:
                self._requests[req.request_id] = req
        for req in added:
            self._admit(req)
        changed = set()
        for rid in aborted:
            req = self._requests.get(rid)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    self.schedulers[req.replica].finish(seq, SequenceStatus.FINISHED_ABORTED)
            changed.add(rid)
        return changed | self._expire()

    def _expire(self) -> set[str]:
        """End every request whose deadline passed (finish_reason "timeout"); its blocks are freed now."""
        now = time.monotonic()
        with self._lock:
            expired = [rid for rid, t in self._deadlines.items() if t <= now]
            for rid in expired:
                del self._deadlines[rid]
        changed = set()
        for rid in expired:
            req = self._requests.get(rid)
            if req is None or req.finished:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    self.schedulers[req.replica].finish(seq, SequenceStatus.FINISHED_TIMEOUT)
            changed.add(rid)
        return changed

    def _least_loaded(self, replicas) -> int:
        """The replica with the fewest unfinished sequences, then the most free KV blocks."""
        return min(replicas, key=lambda i: (self.schedulers[i].num_unfinished,
                                            -self.schedulers[i].block_manager.num_free_blocks, i))

    def _admit(self, req: Request) -> None:
        # a replica being rebuilt gets a request only when none is ready (it moves once one is)
        r = self._least_loaded(self._ready_engines() or range(len(self.schedulers)))
        req.replica = r
        order = next(self._order)
        p = req.params
        if p.prompt_logprobs is not None:
            req.prompt_logprobs = prompt_logprobs.start(len(req.prompt_token_ids))
        for i in range(p.n):
            seq = Sequence(req.request_id, i, req.prompt_token_ids, p.to_wire(self.eos_token_ids, i),
                           arrival=req.arrival, order=order)
            if p.logprobs is not None:
                seq.output_logprobs = []
            if i > 0 and self.config.enable_prefix_caching:
                seq.wait_for = req.seqs[0]
            req.seqs.append(seq)
            self._detok[id(seq)] = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids,
                                                          p.skip_special_tokens, p.stop_strings,
                                                          p.include_stop_str_in_output)
            self.schedulers[r].add_sequence(seq)

    def _process(self, plans: list[SchedulerOutput], results, lost: set[int] = frozenset()) -> set[str]:
        changed = set()
        k = 0
        for r, (sched, plan) in enumerate(zip(self.schedulers, plans, strict=True)):
            n = len(plan.micro_batches)
            if r in lost:   # this replica's micro-batches died with it; forget_ranks re-queued them
                k += n
                continue
            for mb, res in zip(plan.micro_batches, results[k:k + n]):
                prompt_logprobs.record(mb.items, res, self._requests)
            for s in sched.update(plan, results[k:k + n]):
                self._append_token(sched, s)
                changed.add(s.seq.request_id)
            k += n
        return changed

    def _append_token(self, sched: Scheduler, s: SampledToken) -> None:
        seq, tok = s.seq, s.token_id
        req = self._requests[seq.request_id]
        p = req.params
        seq.output_token_ids.append(tok)
        seq.cumulative_logprob += s.logprob
        if seq.output_logprobs is not None:
            d = {tok: s.logprob}
            for t, lp in (s.top_logprobs or [])[:p.logprobs]:
                d.setdefault(int(t), float(lp))
            seq.output_logprobs.append(d)
        num_out = len(seq.output_token_ids)
        may_stop = num_out >= p.min_tokens
        stop_str = self._detok[id(seq)].add_token(tok, check_stop=may_stop)
        status, reason = None, None
        if may_stop and not p.ignore_eos and tok in self.eos_token_ids:
            status = SequenceStatus.FINISHED_STOPPED
        elif may_stop and tok in p.stop_token_ids:
            status, reason = SequenceStatus.FINISHED_STOPPED, tok
        elif stop_str is not None:
            status, reason = SequenceStatus.FINISHED_STOPPED, stop_str
        elif (p.max_tokens is not None and num_out >= p.max_tokens) or seq.num_tokens >= self.max_seq_len:
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            seq.stop_reason = reason
            sched.finish(seq, status)

    @property
    def max_seq_len(self) -> int:
        """Longest prompt + output: the model's limit, or the KV cache of one replica if smaller."""
        return min(self.max_model_len, self.kv_capacity_tokens)

    def _outputs(self, changed: set[str]) -> list[RequestOutput]:
        outs = []
        for rid in sorted(changed, key=lambda r: self._requests[r].seqs[0].order):
            req = self._requests[rid]
            outs.append(self._make_output(req))
            if req.finished:
                with self._lock:
                    del self._requests[rid]
                    self._deadlines.pop(rid, None)
                for seq in req.seqs:
                    self._detok.pop(id(seq), None)
        return outs

    def _make_output(self, req: Request) -> RequestOutput:
        outs = []
        for seq in req.seqs:
            detok = self._detok[id(seq)]
            outs.append(CompletionOutput(
                index=seq.index, text=detok.text(seq.is_finished), token_ids=list(seq.output_token_ids),
                cumulative_logprob=seq.cumulative_logprob,
                logprobs=None if seq.output_logprobs is None else list(seq.output_logprobs),
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason))
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished,
                             num_cached_tokens=req.seqs[0].num_cached_tokens,
                             prompt_logprobs=None if req.prompt_logprobs is None else list(req.prompt_logprobs))

    # -- introspection (tests, metrics) ---------------------------------------------------

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.schedulers)

    @property
    def block_managers(self) -> list:
        """One per replica (the pipelined engine's lanes share their replica's)."""
        return list({id(s.block_manager): s.block_manager for s in self.schedulers}.values())

    @property
    def prefix_hit_tokens(self) -> int:
        return sum(b.prefix_hit_tokens for b in self.block_managers)

    def all_blocks_free(self) -> bool:
        return all(b.all_free() for b in self.block_managers)
