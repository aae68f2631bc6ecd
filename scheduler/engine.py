"""The engine step loop, written against the `Executor` protocol (no torch, no ray).

One `step()`:
1. apply the requests added and aborted since the last step (any thread may add or abort);
2. `schedule()` every replica's `Scheduler`;
3. build the `StepInput`s of every replica's micro-batches and make ONE `executor.execute` call;
4. append the sampled tokens, detokenize, check stop conditions (EOS unless ignore_eos,
   stop_token_ids, stop strings, max_tokens, max_model_len), free finished sequences;
5. return a cumulative `RequestOutput` for every request that got a token or finished.

Data parallelism: one `Scheduler` per replica; a new request goes to the replica with the
fewest unfinished sequences, then the most free KV blocks. All n sequences of a request stay
on one replica.

n > 1 shares the prompt through the prefix cache: sibling 0 is admitted first, the others wait
until its prompt is computed and then reuse its full prompt blocks (each recomputes only the
partial last block, and samples from its own logits with seed + index). Without prefix caching
the siblings compute the prompt independently.
"""

from __future__ import annotations

import itertools
import threading
import time

from tokenizers import Tokenizer

from scheduler.config import EngineConfig
from scheduler.detokenizer import IncrementalDetokenizer
from scheduler.executor import Executor
from scheduler.request import CompletionOutput, Request, RequestOutput, Sequence, SequenceStatus
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import SampledToken, Scheduler, SchedulerOutput
from scheduler.wire import StepInput


class PromptTooLongError(ValueError):
    """A prompt cannot run: it leaves no room for an output token, or can never fit the KV cache."""

    def __init__(self, message: str, prompt_len: int = 0, max_len: int = 0) -> None:
        super().__init__(message)
        self.prompt_len = prompt_len
        self.max_len = max_len


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
        self._order = itertools.count()
        self._step_id = 0
        self.num_steps = 0
        self.max_batch_seqs = 0                                 # largest number of sequences in one step

    # -- requests ------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, prompt_text: str | None = None) -> None:
        """Queue a request; raises PromptTooLongError / ValueError at once if it can never run.

        `prompt` is text (tokenized here, with the tokenizer's special tokens) or token ids;
        `prompt_text` is the text to report for token-id prompts (e.g. a rendered chat).
        """
        params = params if params is not None else SamplingParams()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt).ids
        else:
            text, ids = prompt_text, [int(t) for t in prompt]
        self.check_prompt(ids)
        req = Request(request_id, text, ids, params, time.time() if arrival_time is None else arrival_time)
        with self._lock:
            if request_id in self._requests or any(r.request_id == request_id for r in self._added):
                raise ValueError(f"request_id {request_id!r} is already running")
            self._added.append(req)

    def check_prompt(self, ids: list[int]) -> None:
        n = len(ids)
        if n == 0:
            raise ValueError("the prompt is empty; give at least one token")
        vocab = self.tokenizer.get_vocab_size(with_added_tokens=True)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad} is outside the tokenizer's vocabulary [0, {vocab})")
        if n >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {n} tokens but max_model_len is {self.max_model_len}: "
                                     "prompt + at least one output token must fit", n, self.max_model_len)
        if n + 1 > self.kv_capacity_tokens:
            raise PromptTooLongError(f"prompt has {n} tokens but the KV cache holds at most "
                                     f"{self.kv_capacity_tokens} tokens per replica "
                                     f"({self.executor.num_kv_blocks} blocks x {self.config.block_size}); "
                                     "raise num_kv_blocks/kv_cache_memory or shorten the prompt",
                                     n, self.kv_capacity_tokens)

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

    # -- the loop ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        with self._step_lock:
            changed = self._apply_inboxes()
            plans = [s.schedule() for s in self.schedulers]
            steps: list[StepInput] = []
            for r, plan in enumerate(plans):
                steps += [mb.to_step_input(self._step_id, r, i) for i, mb in enumerate(plan.micro_batches)]
            if steps:
                self.max_batch_seqs = max(self.max_batch_seqs, sum(len(s.scheduled) for s in steps))
                results = self.executor.execute(steps)
                if len(results) != len(steps):
                    raise RuntimeError(f"executor returned {len(results)} outputs for {len(steps)} steps")
                self._step_id += 1
                self.num_steps += 1
                changed |= self._process(plans, results)
            return self._outputs(changed)

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
        return changed

    def _admit(self, req: Request) -> None:
        r = min(range(len(self.schedulers)), key=lambda i: (self.schedulers[i].num_unfinished,
                                                            -self.schedulers[i].block_manager.num_free_blocks, i))
        req.replica = r
        order = next(self._order)
        p = req.params
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

    def _process(self, plans: list[SchedulerOutput], results) -> set[str]:
        changed = set()
        k = 0
        for sched, plan in zip(self.schedulers, plans, strict=True):
            n = len(plan.micro_batches)
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
                             num_cached_tokens=req.seqs[0].num_cached_tokens)

    # -- introspection (tests, metrics) ---------------------------------------------------

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.schedulers)

    @property
    def prefix_hit_tokens(self) -> int:
        return sum(s.block_manager.prefix_hit_tokens for s in self.schedulers)

    def all_blocks_free(self) -> bool:
        return all(s.block_manager.all_free() for s in self.schedulers)
