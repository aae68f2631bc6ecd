"""`PipelinedEngine` (scheduler.pipelined) against the toy: with P lanes per replica and one
micro-batch of each in flight across steps, outputs equal the toy's reference under every layout,
including sequences aborted or timed out while in flight and a replica that fails with other
lanes' micro-batches still in flight; every block is free at the end and the ranks hold exactly
the sequences whose drop is pending."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine
from scheduler.executor import ReplicaFailure, ReplicaRecovery, ReplicasFailedError
from scheduler.pipelined import PipelinedEngine, make_engine
from scheduler.sampling_params import SamplingParams
from tests.unit.test_engine_fake_executor import LAYOUTS, MAX_TOKENS, PROMPTS, check, run, submit
from tests.unit.test_engine_recovery import run_streams
from tests.unit.toy_model import EOS, ToyExecutor, make_tokenizer, reference

TOKENIZER = make_tokenizer()
REBUILD_TICKS = 3


@dataclass(eq=False)
class _Handle:
    replica: int
    outputs: list | None        # None: the replica's ranks died running it


class AsyncToy(ToyExecutor):
    """The toy with `submit`/`collect`: its ranks run a micro-batch when it is submitted (in
    submission order, as Ray runs each actor's calls) and the outputs wait for `collect`. At the
    submit numbered in `faults` the replica's ranks die (state wiped); later submits to it run
    nothing; the failure is reported by the `collect` of the micro-batch that died, which drops the
    replica's other uncollected micro-batches and rebuilds it in REBUILD_TICKS more calls."""

    def __init__(self, *args, faults: dict[int, int] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.faults = dict(faults or {})
        self.pending: list[_Handle] = []
        self.max_pending = 0
        self.num_submits = 0
        self.broken: set[int] = set()
        self.rebuilding: dict[int, int] = {}
        self.done: list[ReplicaRecovery] = []
        self.failed: list[int] = []

    @property
    def ready_replicas(self) -> frozenset[int]:
        return frozenset(r for r in range(self.num_replicas) if r not in self.rebuilding)

    def wait_ready(self, timeout_s: float) -> bool:
        self._tick()
        return bool(self.ready_replicas)

    def take_recoveries(self) -> list[ReplicaRecovery]:
        done, self.done = self.done, []
        return done

    def _tick(self) -> None:
        for r in list(self.rebuilding):
            self.rebuilding[r] -= 1
            if self.rebuilding[r] == 0:
                del self.rebuilding[r]
                self.done.append(ReplicaRecovery(r, "injected", time.monotonic(), time.monotonic(), 1))

    def submit(self, steps) -> _Handle:
        (replica,) = {s.replica for s in steps}    # one lane's micro-batch of one replica
        assert replica in self.ready_replicas, "a replica being rebuilt was scheduled"
        self.num_submits += 1
        self._tick()
        mine = sum(h.replica == replica for h in self.pending)
        assert mine < self.max_in_flight, "more micro-batches in flight than pipeline stages"
        outputs = None if replica in self.broken else self.execute(steps)
        if self.faults.get(self.num_submits) == replica:
            self.seqs[replica] = {}
            self.kv[replica] = [[None] * self.block_size for _ in range(self.num_kv_blocks)]
            self.broken.add(replica)
            outputs = None
        handle = _Handle(replica, outputs)
        self.pending.append(handle)
        self.max_pending = max(self.max_pending, mine + 1)
        return handle

    def collect(self, handle: _Handle):
        assert handle is self.pending[0], "collected out of submission order"
        self.pending.pop(0)
        if handle.outputs is not None:
            return handle.outputs
        r = handle.replica
        self.broken.discard(r)
        self.pending = [h for h in self.pending if h.replica != r]   # its ranks were killed
        self.rebuilding[r] = REBUILD_TICKS
        self.failed.append(r)
        raise ReplicasFailedError([ReplicaFailure(r, "injected", time.monotonic())], [None])


def make(pp=2, dp=1, num_blocks=256, block_size=4, max_num_seqs=64, max_num_batched_tokens=512, prefix=True,
         faults=None, max_model_len=200) -> tuple[PipelinedEngine, AsyncToy]:
    cfg = EngineConfig(model="toy", block_size=block_size, max_num_seqs=max_num_seqs,
                       max_num_batched_tokens=max_num_batched_tokens, pipeline_parallel_size=pp,
                       data_parallel_size=dp, enable_prefix_caching=prefix)
    ex = AsyncToy(num_blocks, block_size, num_replicas=dp, max_in_flight=pp, faults=faults)
    eng = make_engine(cfg, ex, TOKENIZER, [EOS], max_model_len)
    assert isinstance(eng, PipelinedEngine)
    return eng, ex


def check_clean(eng: PipelinedEngine, ex: AsyncToy) -> None:
    assert not eng.has_unfinished_requests() and eng.all_blocks_free(), "KV blocks leaked"
    p = eng.lanes_per_replica
    for r, rank_cache in enumerate(ex.seqs):   # the ranks hold exactly the sequences whose drop is pending
        if r not in ex.failed:
            assert set(rank_cache) == {s for sched in eng.schedulers[r * p:(r + 1) * p] for s in sched._dropped_seq_ids}


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k not in ("pipeline_3_micro_batches", "one_seq_at_a_time")]
                         + ["pp3"])
def test_lanes_in_flight_give_the_reference_outputs_under_every_layout(layout):
    kw = {"pp": 3, "max_num_batched_tokens": 24} if layout == "pp3" else dict(LAYOUTS[layout])
    kw.setdefault("pp", 2)
    eng, ex = make(**kw)
    submit(eng, PROMPTS, MAX_TOKENS)
    check(run(eng), PROMPTS, MAX_TOKENS)
    check_clean(eng, ex)
    assert ex.max_pending == kw["pp"], "the lanes never overlapped"
    if "preemption" in layout:
        assert eng.num_preemptions > 0


def test_abort_and_timeout_of_sequences_in_flight():
    eng, ex = make(max_num_batched_tokens=16)
    submit(eng, PROMPTS[:8], [30] * 8, ignore_eos=True)
    eng.add_request("t", PROMPTS[8], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, timeout=0.5))
    start = time.monotonic()
    in_flight: set[str] = set()
    while "t" not in in_flight or len(in_flight) < 2:   # step until "t" and another are in the other lane's flight
        eng.step()
        in_flight = {i.seq.request_id for f in eng._flights for i in f.plan.items}
    victim = sorted(in_flight - {"t"})[0]
    produced = {rid: list(eng._requests[rid].seqs[0].output_token_ids) for rid in (victim, "t")}
    eng.abort_request(victim)
    time.sleep(max(0.0, start + 0.5 - time.monotonic()))
    outs = {o.request_id: o for o in eng.step()}   # both end before the flight holding them is collected
    assert outs[victim].outputs[0].finish_reason == "abort" and outs["t"].outputs[0].finish_reason == "timeout"
    for rid in (victim, "t"):   # the token their flight brought back is dropped with them
        assert outs[rid].outputs[0].token_ids == produced[rid], rid
    outs |= run(eng)
    for i in range(8):
        if str(i) != victim:
            assert outs[str(i)].outputs[0].token_ids == reference(PROMPTS[i], 30, ignore_eos=True)[0]
    check_clean(eng, ex)


@pytest.mark.parametrize("dp,faults", [(1, {5: 0, 20: 0}), (2, {7: 1, 16: 0})])
def test_failed_replica_with_other_lanes_in_flight_recomputes_and_equals_undisturbed_run(dp, faults):
    eng, ex = make(dp=dp, max_num_seqs=16, max_num_batched_tokens=64, faults=faults)
    submit(eng, PROMPTS, MAX_TOKENS)
    outs, streamed = run_streams(eng)
    check(outs, PROMPTS, MAX_TOKENS)
    for rid, out in outs.items():   # a stream never repeats a token
        assert streamed[rid] == out.outputs[0].token_ids, rid
    assert ex.failed == sorted(ex.failed, key=list(faults.values()).index) and len(eng.recoveries) == len(faults)
    assert eng.all_blocks_free() and eng.num_preemptions == 0


def test_make_engine_falls_back_to_fill_and_drain():
    def cfg(**kw):
        return EngineConfig(model="toy", block_size=4, **kw)
    sync_only = ToyExecutor(64, 4, max_in_flight=2)
    assert type(make_engine(cfg(pipeline_parallel_size=2), sync_only, TOKENIZER, [EOS], 100)) is LLMEngine
    async_toy = AsyncToy(64, 4, max_in_flight=2)
    for kw in ({"pipeline_parallel_size": 2, "pipeline_overlap": False}, {}, {"pipeline_parallel_size": 2,
                                                                             "max_num_seqs": 1}):
        assert type(make_engine(cfg(**kw), async_toy, TOKENIZER, [EOS], 100)) is LLMEngine, kw
    assert isinstance(make_engine(cfg(pipeline_parallel_size=2), async_toy, TOKENIZER, [EOS], 100), PipelinedEngine)
