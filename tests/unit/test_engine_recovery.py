"""Recovery in the engine, against the toy executor: when `execute` reports a replica rebuilt
(`ReplicasRestartedError`, its ranks' KV cache and sequences wiped), the engine re-queues that
replica's sequences for recompute from prompt + tokens already produced, keeps the other
replicas' results of the same step, and every output equals an undisturbed run. The toy ranks
assert that no step reads a KV entry they do not hold, so a stale prefix-cache hit would fail."""

from __future__ import annotations

import time

import pytest

from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine
from scheduler.errors import ConfigError, ConfigTypeError
from scheduler.executor import ReplicaRecovery, ReplicasRestartedError
from scheduler.request import RequestOutput
from scheduler.sampling_params import SamplingParams
from scheduler.streaming import OutputDeltas
from tests.unit.test_engine_fake_executor import MAX_TOKENS, PROMPTS, check, submit
from tests.unit.toy_model import EOS, ToyExecutor, make_tokenizer

TOKENIZER = make_tokenizer()


class FailingToyExecutor(ToyExecutor):
    """At the listed execute calls, replica r "dies": its rank state is wiped (a rebuilt replica)."""

    def __init__(self, *args, faults: dict[int, int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.faults = dict(faults)          # execute call number -> replica that fails in it
        self.num_calls = 0

    def execute(self, steps):
        self.num_calls += 1
        replica = self.faults.get(self.num_calls)
        outputs = super().execute(steps)
        if replica is None or all(s.replica != replica for s in steps):
            return outputs
        self.seqs[replica] = {}
        self.kv[replica] = [[None] * self.block_size for _ in range(self.num_kv_blocks)]
        now = time.monotonic()
        rec = ReplicaRecovery(replica, f"injected failure in call {self.num_calls}", now, now, 1)
        raise ReplicasRestartedError([rec], [None if s.replica == replica else o
                                             for s, o in zip(steps, outputs, strict=True)])


def make(faults, dp=1, pp=1, num_blocks=256):
    cfg = EngineConfig(model="toy", block_size=4, max_num_seqs=16, max_num_batched_tokens=64,
                       pipeline_parallel_size=pp, data_parallel_size=dp)
    ex = FailingToyExecutor(num_blocks, 4, num_replicas=dp, max_in_flight=pp, faults=faults)
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
    assert [r.replica for r in eng.recoveries] == [faults[c] for c in sorted(faults) if c <= ex.num_calls]
    assert eng.all_blocks_free()
    assert eng.num_preemptions == 0, "a rebuild is not a preemption"


def test_other_replica_keeps_its_results_of_the_failed_step():
    eng, ex = make({4: 1}, dp=2)
    submit(eng, PROMPTS[:8], [12] * 8)
    for _ in range(3):
        eng.step()
    before = {rid: list(r.seqs[0].output_token_ids) for rid, r in eng._requests.items()}
    eng.step()                               # call 4: replica 1 fails, replica 0 goes on
    after = {rid: list(r.seqs[0].output_token_ids) for rid, r in eng._requests.items()}
    for rid, req in eng._requests.items():
        grew = len(after[rid]) - len(before.get(rid, []))
        assert grew == (1 if req.replica == 0 else 0), (rid, req.replica)
        if req.replica == 1:
            assert after[rid] == before[rid], "tokens already produced are kept for the recompute"
    outs, _ = run_streams(eng)
    assert len(eng.recoveries) == 1 and eng.all_blocks_free()


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
