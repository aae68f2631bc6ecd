"""Recovery in the engine, against the toy executor: when `execute` reports a replica failed
(`ReplicasFailedError`, its ranks' KV cache and sequences wiped), the engine re-queues that
replica's sequences for recompute from prompt + tokens already produced, keeps the other
replicas' results of the same step, schedules nothing on the replica until the executor has
rebuilt it (the toy rebuilds in `REBUILD_TICKS` of its other calls), moves its queued requests to
a ready replica, waits (bounded, `wait_ready`) when no replica is ready while aborts and
timeouts still apply, and every output equals an undisturbed run. The toy ranks assert that no
step reads a KV entry they do not hold, so a stale prefix-cache hit would fail."""

from __future__ import annotations

import time

import pytest

from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine
from scheduler.errors import ConfigError, ConfigTypeError
from scheduler.executor import EngineDeadError, ReplicaFailure, ReplicaRecovery, ReplicasFailedError
from scheduler.request import RequestOutput
from scheduler.sampling_params import SamplingParams
from scheduler.streaming import OutputDeltas
from tests.unit.test_engine_fake_executor import MAX_TOKENS, PROMPTS, check, expected, submit
from tests.unit.toy_model import EOS, ToyExecutor, make_tokenizer

TOKENIZER = make_tokenizer()
REBUILD_TICKS = 3     # a failed toy replica is ready again after this many execute/wait_ready calls


class FailingToyExecutor(ToyExecutor):
    """At the listed execute calls, replica r "dies": its rank state is wiped and it is rebuilt in
    the "background" - ready again after REBUILD_TICKS more calls (execute or wait_ready)."""

    def __init__(self, *args, faults: dict[int, int], rebuild_fails: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.faults = dict(faults)          # execute call number -> replica that fails in it
        self.rebuild_fails = rebuild_fails  # the rebuild ends the executor instead (the budget ran out)
        self.num_calls = 0
        self.num_waits = 0
        self.rebuilding: dict[int, int] = {}            # replica -> ticks left
        self.done: list[ReplicaRecovery] = []
        self.ran: list[set[int]] = []                   # per execute call: the replicas it ran
        self.failed: list[int] = []
        self.dead: str | None = None

    @property
    def ready_replicas(self) -> frozenset[int]:
        return frozenset(r for r in range(self.num_replicas) if r not in self.rebuilding)

    def wait_ready(self, timeout_s: float) -> bool:
        assert 0 < timeout_s <= 1.0, "the engine waits in bounded slices"
        self.num_waits += 1
        self._tick()
        return bool(self.ready_replicas)

    def take_recoveries(self) -> list[ReplicaRecovery]:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        done, self.done = self.done, []
        return done

    def _tick(self) -> None:
        for r in list(self.rebuilding):
            self.rebuilding[r] -= 1
            if self.rebuilding[r] == 0:
                del self.rebuilding[r]
                if self.rebuild_fails:
                    self.dead = f"the rebuild of replica(s) [{r}] failed"
                else:
                    self.done.append(ReplicaRecovery(r, "injected", time.monotonic(), time.monotonic(), 1))

    def execute(self, steps):
        assert {s.replica for s in steps} <= self.ready_replicas, "a replica being rebuilt was scheduled"
        self.num_calls += 1
        self.ran.append({s.replica for s in steps})
        self._tick()
        replica = self.faults.get(self.num_calls)
        outputs = super().execute(steps)
        if replica is None or all(s.replica != replica for s in steps):
            return outputs
        self.seqs[replica] = {}
        self.kv[replica] = [[None] * self.block_size for _ in range(self.num_kv_blocks)]
        self.rebuilding[replica] = REBUILD_TICKS
        self.failed.append(replica)
        failure = ReplicaFailure(replica, f"injected failure in call {self.num_calls}", time.monotonic())
        raise ReplicasFailedError([failure], [None if s.replica == replica else o
                                              for s, o in zip(steps, outputs, strict=True)])


def make(faults, dp=1, pp=1, num_blocks=256, rebuild_fails=False):
    cfg = EngineConfig(model="toy", block_size=4, max_num_seqs=16, max_num_batched_tokens=64,
                       pipeline_parallel_size=pp, data_parallel_size=dp)
    ex = FailingToyExecutor(num_blocks, 4, num_replicas=dp, max_in_flight=pp, faults=faults,
                            rebuild_fails=rebuild_fails)
    return LLMEngine(cfg, ex, TOKENIZER, [EOS], 200), ex


def run_streams(eng: LLMEngine) -> tuple[dict[str, RequestOutput], dict[str, list[int]]]:
    """Finished outputs, and per request the tokens of every delta concatenated (what a stream sends)."""
    deltas, streamed, done = OutputDeltas(), {}, {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            d = deltas.delta(out)
            streamed.setdefault(out.request_id, []).extend(d.outputs[0].token_ids)
            if out.finished:
                done[out.request_id] = out
    return done, streamed


@pytest.mark.parametrize("dp,pp,faults", [
    (1, 1, {3: 0}),                      # prefill in flight
    (1, 2, {6: 0, 9: 0, 30: 0}),         # mid-decode, again soon after, and late
    (2, 2, {5: 1, 12: 0, 13: 1}),        # one replica of two, then both in a row
])
def test_rebuilt_replica_recomputes_and_outputs_equal_undisturbed_run(dp, pp, faults):
    eng, ex = make(faults, dp=dp, pp=pp)
    submit(eng, PROMPTS, MAX_TOKENS)
    outs, streamed = run_streams(eng)
    check(outs, PROMPTS, MAX_TOKENS)
    # a stream never repeats a token: the concatenated deltas are exactly the final output
    for rid, out in outs.items():
        assert streamed[rid] == out.outputs[0].token_ids, rid
    assert ex.failed, "no fault fired"
    assert [r.replica for r in eng.recoveries] == ex.failed[:len(eng.recoveries)]
    assert eng.all_blocks_free()
    assert eng.num_preemptions == 0, "a rebuild is not a preemption"


def test_other_replica_keeps_serving_and_takes_over_the_queue_while_one_is_rebuilt():
    eng, ex = make({4: 1}, dp=2)
    finished: dict[str, RequestOutput] = {}

    def step():
        finished.update((o.request_id, o) for o in eng.step() if o.finished)

    submit(eng, PROMPTS[:8], [12] * 8)
    for _ in range(3):
        step()
    before = {rid: list(r.seqs[0].output_token_ids) for rid, r in eng._requests.items()}
    on_1 = {rid for rid, r in eng._requests.items() if r.replica == 1}
    step()                               # call 4: replica 1 fails, replica 0 goes on
    after = {rid: list(r.seqs[0].output_token_ids) for rid, r in eng._requests.items()}
    for rid, req in eng._requests.items():
        grew = len(after[rid]) - len(before.get(rid, []))
        assert grew == (1 if req.replica == 0 else 0), (rid, req.replica)
        if req.replica == 1:
            assert after[rid] == before[rid], "tokens already produced are kept for the recompute"
    step()                               # replica 1 is being rebuilt: its requests move to replica 0
    assert 1 not in ex.ready_replicas and ex.ran[-1] == {0}
    assert on_1 and all(eng._requests[rid].replica == 0 for rid in on_1 if rid in eng._requests)
    eng.add_request("late", PROMPTS[9], SamplingParams(temperature=0, max_tokens=3))
    step()
    assert eng._requests["late"].replica == 0, "a new request goes to a ready replica"
    while not eng.recoveries:
        assert 1 not in ex.ran[-1], "nothing runs on a replica being rebuilt"
        step()
    assert ex.ran[4:] and all(ran == {0} for ran in ex.ran[4:]), "replica 0 ran every step of the rebuild"
    eng.add_request("after", PROMPTS[10], SamplingParams(temperature=0, max_tokens=3))
    step()
    assert eng._requests["after"].replica == 1, "the rebuilt replica takes new requests again"
    finished.update(run_streams(eng)[0])
    assert len(eng.recoveries) == 1 and eng.all_blocks_free()
    check(finished, PROMPTS[:8], [12] * 8)


def test_with_no_replica_ready_a_step_waits_for_the_rebuild_and_still_applies_aborts_and_timeouts():
    eng, ex = make({3: 0})
    submit(eng, PROMPTS[:4], [10] * 4)
    for _ in range(3):
        eng.step()                            # call 3: the only replica fails
    assert ex.ready_replicas == frozenset()
    eng.abort_request("0")
    eng.add_request("t", PROMPTS[5], SamplingParams(temperature=0, max_tokens=5, timeout=0.001))
    time.sleep(0.01)
    calls, waits = ex.num_calls, ex.num_waits
    outs = {o.request_id: o for o in eng.step()}
    assert ex.num_calls == calls and ex.num_waits == waits + 1, "no step ran; the engine waited once"
    assert outs["0"].outputs[0].finish_reason == "abort" and outs["t"].outputs[0].finish_reason == "timeout"
    done, _ = run_streams(eng)
    assert len(eng.recoveries) == 1
    ref = expected(PROMPTS[:4], [10] * 4)
    assert [done[str(i)].outputs[0].token_ids for i in (1, 2, 3)] == [ref[i][0] for i in (1, 2, 3)]
    assert eng.all_blocks_free()


def test_a_rebuild_that_fails_past_the_budget_ends_the_engine_at_the_next_step():
    eng, ex = make({2: 0}, rebuild_fails=True)
    submit(eng, PROMPTS[:2], [10] * 2)
    with pytest.raises(EngineDeadError, match=r"rebuild of replica\(s\) \[0\] failed"):
        run_streams(eng)


def test_recovery_with_prefix_cache_and_n_siblings():
    eng, ex = make({5: 0})
    shared = PROMPTS[0] * 3
    for i in range(4):
        eng.add_request(str(i), shared + [i + 1], SamplingParams(temperature=0, max_tokens=10, n=2))
    outs, streamed = run_streams(eng)
    ref, _ = make({})
    for i in range(4):
        ref.add_request(str(i), shared + [i + 1], SamplingParams(temperature=0, max_tokens=10, n=2))
    expected, _ = run_streams(ref)
    for rid in expected:
        assert [c.token_ids for c in outs[rid].outputs] == [c.token_ids for c in expected[rid].outputs]
    assert len(eng.recoveries) == 1


@pytest.mark.parametrize("value,error", [(-1, ConfigError), (1001, ConfigError), ("3", ConfigTypeError),
                                         (2.0, ConfigTypeError), (True, ConfigTypeError)])
def test_max_restarts_is_validated_with_a_message_naming_it(value, error):
    with pytest.raises(error, match=r"max_restarts=.* (is out of range|must be an integer).*\[0, 1000\]"):
        EngineConfig(model="toy", max_restarts=value)
    assert EngineConfig(model="toy", max_restarts=0).max_restarts == 0
