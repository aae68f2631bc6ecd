"""Scheduler: continuous batching, token budget and chunked prefill, preemption and resume,
micro-batch split, diff encoding, and data-parallel routing in the engine."""

from __future__ import annotations

import pytest

from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine
from scheduler.request import Sequence, SequenceStatus
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import Scheduler
from scheduler.wire import SeqSampling, StepOutput
from tests.unit.toy_model import EOS, ToyExecutor, make_tokenizer

_order = iter(range(10**9))


def cfg(**kw):
    base = dict(model="toy", block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    return EngineConfig(**(base | kw))


def seq(n_prompt, first=1):
    return Sequence("r", 0, list(range(first, first + n_prompt)), SeqSampling(temperature=0.0), order=next(_order))


def fake_step(sched: Scheduler, token=7):
    """Schedule one step and feed back `token` for every sampled sequence."""
    out = sched.schedule()
    results = []
    for i, mb in enumerate(out.micro_batches):
        sampled = [x.seq_id for x in mb.scheduled if x.sample]
        results.append(StepOutput(0, 0, i, sampled, [token] * len(sampled), [-1.0] * len(sampled),
                                  [None] * len(sampled)))
    for s in sched.update(out, results):
        s.seq.output_token_ids.append(s.token_id)
    return out


def finish(sched, s):
    sched.finish(s, SequenceStatus.FINISHED_STOPPED)


def test_new_requests_join_and_finished_ones_leave_every_step():
    sched = Scheduler(cfg(), 64)
    a = seq(5)
    sched.add_sequence(a)
    out = fake_step(sched)
    assert [(i.seq, i.num_new, i.sample) for i in out.items] == [(a, 5, True)]
    b = seq(3)
    sched.add_sequence(b)
    out = fake_step(sched)
    assert [(i.seq, i.num_new) for i in out.items] == [(a, 1), (b, 3)]      # decode first, then prefill
    finish(sched, a)
    out = fake_step(sched)
    assert [i.seq for i in out.items] == [b]
    assert out.micro_batches[0].finished_seq_ids == [a.seq_id]              # ranks forget a
    finish(sched, b)
    assert sched.block_manager.all_free() and not sched.has_unfinished()


def test_max_num_seqs_limits_running():
    sched = Scheduler(cfg(max_num_seqs=2), 64)
    seqs = [seq(3) for _ in range(4)]
    for s in seqs:
        sched.add_sequence(s)
    out = fake_step(sched)
    assert [i.seq for i in out.items] == seqs[:2] and len(sched.waiting) == 2
    finish(sched, seqs[0])
    out = fake_step(sched)
    assert [i.seq for i in out.items] == [seqs[1], seqs[2]]
    for s in seqs[1:]:
        sched.finish(s, SequenceStatus.FINISHED_ABORTED)
    assert sched.block_manager.all_free()


def test_chunked_prefill_respects_budget_and_decodes_go_first():
    sched = Scheduler(cfg(max_num_batched_tokens=8), 64)
    a = seq(2)
    sched.add_sequence(a)
    fake_step(sched)                                  # a prefilled, decoding from now on
    b = seq(20, first=50)
    sched.add_sequence(b)
    chunks = []
    while b.num_computed_tokens < b.num_tokens - 1 or not b.output_token_ids:
        out = fake_step(sched)
        assert out.num_tokens <= 8
        assert out.items[0].seq is a and out.items[0].num_new == 1
        chunks.append((out.items[1].num_new, out.items[1].sample))
    assert chunks == [(7, False), (7, False), (6, True)]
    # the wire: b is new once, then only its position advances
    finish(sched, a)
    finish(sched, b)
    assert sched.block_manager.all_free()


def test_two_prefills_share_the_budget_fcfs():
    sched = Scheduler(cfg(max_num_batched_tokens=10), 64)
    a, b = seq(8), seq(8, first=30)
    sched.add_sequence(a)
    sched.add_sequence(b)
    out = fake_step(sched)
    assert [(i.seq, i.num_new, i.sample) for i in out.items] == [(a, 8, True), (b, 2, False)]
    out = fake_step(sched)
    assert [(i.seq, i.num_new) for i in out.items] == [(a, 1), (b, 6)]
    finish(sched, a)
    finish(sched, b)


def test_preemption_frees_youngest_and_resume_sends_whole_state_as_new():
    sched = Scheduler(cfg(block_size=2, max_num_batched_tokens=64), 4)
    a, b = seq(3), seq(3, first=40)                  # 2 blocks each: the pool is full
    sched.add_sequence(a)
    sched.add_sequence(b)
    fake_step(sched, token=9)                        # both prefilled: 4 tokens each, 2 blocks each
    fake_step(sched, token=9)                        # token 4 computed: still 2 blocks; 5 tokens each
    out = fake_step(sched, token=9)                  # token 5 needs a 3rd block: b (youngest) goes
    assert sched.num_preemptions == 1 and out.num_preempted == 1
    assert [i.seq for i in out.items] == [a] and b.status == SequenceStatus.WAITING
    old_b = out.micro_batches[0].finished_seq_ids
    assert len(old_b) == 1 and old_b[0] != b.seq_id and b.num_computed_tokens == 0
    b_tokens = b.token_ids
    finish(sched, a)
    out = fake_step(sched, token=9)
    mb = out.micro_batches[0]
    assert [n.seq_id for n in mb.new_sequences] == [b.seq_id]
    assert mb.new_sequences[0].token_ids == b_tokens and mb.new_sequences[0].num_prompt_tokens == 3
    x = mb.scheduled[0]
    assert x.sample and x.num_computed + x.num_new == len(b_tokens)
    assert x.num_computed == 2          # its own first block survived in the prefix cache
    assert a.seq_id in mb.finished_seq_ids
    finish(sched, b)
    assert sched.block_manager.all_free()


def test_preempted_sequence_goes_back_to_the_front_of_waiting():
    sched = Scheduler(cfg(block_size=2), 4)
    a, b, c = seq(3), seq(3, first=20), seq(1, first=30)
    for s in (a, b, c):
        sched.add_sequence(s)
    fake_step(sched)                                 # a and b fit, c waits
    assert list(sched.waiting) == [c]
    fake_step(sched)
    fake_step(sched)                                 # b preempted -> before c
    assert list(sched.waiting) == [b, c]
    for s in (a, b, c):
        sched.finish(s, SequenceStatus.FINISHED_ABORTED)
    assert sched.block_manager.all_free()


def test_diff_encoding_sends_only_new_tokens_and_blocks():
    sched = Scheduler(cfg(block_size=2), 32)
    a = seq(3)
    sched.add_sequence(a)
    out = fake_step(sched, token=5)
    mb = out.micro_batches[0]
    assert len(mb.new_sequences) == 1 and mb.new_sequences[0].block_ids == a.block_table[:2]
    assert mb.scheduled[0].appended_token_ids == [] and mb.scheduled[0].new_block_ids == []
    out = fake_step(sched, token=6)                  # 4 tokens: still 2 blocks
    x = out.micro_batches[0].scheduled[0]
    assert out.micro_batches[0].new_sequences == []
    assert (x.num_computed, x.num_new, x.appended_token_ids, x.new_block_ids) == (3, 1, [5], [])
    out = fake_step(sched, token=7)                  # 5 tokens: a 3rd block
    x = out.micro_batches[0].scheduled[0]
    assert (x.num_computed, x.appended_token_ids, x.new_block_ids) == (4, [6], [a.block_table[2]])
    finish(sched, a)


def test_micro_batches_balanced_by_tokens_and_never_empty():
    sched = Scheduler(cfg(pipeline_parallel_size=3, max_num_batched_tokens=100), 64)
    lens = [20, 3, 9, 9, 2, 1, 14]
    seqs = [seq(n, first=10 * i + 1) for i, n in enumerate(lens)]
    for s in seqs:
        sched.add_sequence(s)
    out = sched.schedule()
    assert len(out.micro_batches) == 3
    loads = sorted(mb.num_tokens for mb in out.micro_batches)
    assert loads == [19, 19, 20]
    ids = [x.seq_id for mb in out.micro_batches for x in mb.scheduled]
    assert sorted(ids) == sorted(s.seq_id for s in seqs)
    for mb in out.micro_batches:                     # every scheduled seq has its NewSequence alongside
        assert {n.seq_id for n in mb.new_sequences} == {x.seq_id for x in mb.scheduled}
    for s in seqs:
        sched.finish(s, SequenceStatus.FINISHED_ABORTED)
    two = Scheduler(cfg(pipeline_parallel_size=4), 64)
    for s in (seq(3), seq(4)):
        two.add_sequence(s)
    assert len(two.schedule().micro_batches) == 2    # fewer sequences than stages


def test_step_input_carries_replica_and_micro_batch_index():
    sched = Scheduler(cfg(pipeline_parallel_size=2), 64)
    for s in (seq(3), seq(4)):
        sched.add_sequence(s)
    out = sched.schedule()
    si = [mb.to_step_input(7, 1, i) for i, mb in enumerate(out.micro_batches)]
    assert [(s.step_id, s.replica, s.micro_batch) for s in si] == [(7, 1, 0), (7, 1, 1)]


def test_sibling_waits_for_leader_prompt_then_hits_cache():
    sched = Scheduler(cfg(block_size=4), 64)
    lead = seq(10)
    sib = Sequence("r", 1, list(lead.prompt_token_ids), SeqSampling(), order=lead.order, wait_for=lead)
    other = seq(2, first=80)
    for s in (lead, sib, other):
        sched.add_sequence(s)
    out = fake_step(sched)
    assert [i.seq for i in out.items] == [lead, other]    # the sibling waits, others pass it
    out = fake_step(sched)
    assert sib in [i.seq for i in out.items] and sib.num_cached_tokens == 8
    for s in (lead, sib, other):
        finish(sched, s)
    assert sched.block_manager.all_free()


@pytest.mark.parametrize("dp", [2, 3])
def test_engine_routes_to_least_loaded_replica(dp):
    """Round-robin would put the singles on every replica in turn; least-loaded fills the idle ones first."""
    c = cfg(data_parallel_size=dp)
    eng = LLMEngine(c, ToyExecutor(64, 4, num_replicas=dp), make_tokenizer(), [EOS], 100)
    # a request with n = dp + 1 loads replica 0 with dp + 1 sequences
    eng.add_request("big", [1, 2, 3], SamplingParams(n=dp + 1, temperature=1.0, seed=1, max_tokens=8,
                                                     ignore_eos=True))
    # then (dp - 1) * (dp + 1) singles: least-loaded sends them all to replicas 1..dp-1 until every
    # replica holds dp + 1 sequences; round-robin would send every dp-th one to replica 0
    singles = [f"s{i}" for i in range((dp - 1) * (dp + 1))]
    for rid in singles:
        eng.add_request(rid, [1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True))
    eng.step()
    assert eng._requests["big"].replica == 0
    assert all(eng._requests[rid].replica != 0 for rid in singles), \
        [eng._requests[r].replica for r in singles]
    assert [s.num_unfinished for s in eng.schedulers] == [dp + 1] * dp
    # replica 0 drains first (short requests there), so the next arrivals go to replica 0 only
    while eng.has_unfinished_requests():
        eng.step()
    eng.add_request("long1", [1, 2], SamplingParams(max_tokens=30, ignore_eos=True))   # -> replica 0 (tie: index)
    eng.add_request("long2", [1, 2], SamplingParams(max_tokens=30, ignore_eos=True))   # -> replica 1
    eng.step()
    eng.add_request("after", [1, 2], SamplingParams(max_tokens=2))
    eng.step()
    loads = {r: eng._requests[r].replica for r in ("long1", "long2", "after")}
    assert loads["long1"] != loads["long2"]
    if dp == 3:
        assert loads["after"] == 2          # the idle replica, not replica 0 as round-robin's next turn
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.all_blocks_free()


def test_ties_broken_by_free_blocks():
    c = cfg(data_parallel_size=2)
    eng = LLMEngine(c, ToyExecutor(64, 4, num_replicas=2), make_tokenizer(), [EOS], 100)
    eng.add_request("a", [1] * 40, SamplingParams(max_tokens=1))       # replica 0 holds cached blocks? no: free
    eng.step()
    assert not eng.has_unfinished_requests()
    eng.schedulers[0].block_manager._free_plain.pop()                   # replica 0: one block fewer free
    eng.schedulers[0].block_manager.num_blocks -= 1
    eng.add_request("b", [1, 2], SamplingParams(max_tokens=1))
    eng.step()
    assert eng.schedulers[1].block_manager.prefix_query_tokens == 2    # went to replica 1
