"""LLMEngine against the toy executor: outputs never depend on batching, chunking, preemption,
pipeline micro-batches, replicas or prefix hits, and every block is free after every test."""

from __future__ import annotations

import random
import threading

import pytest

from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine, PromptTooLongError
from scheduler.sampling_params import SamplingParams
from tests.unit.toy_model import EOS, VOCAB, ToyExecutor, make_tokenizer, reference

TOKENIZER = make_tokenizer()


@pytest.fixture
def make_engine():
    """Build engines over the toy; at teardown every one must be drained with all blocks free."""
    made: list[tuple[LLMEngine, ToyExecutor]] = []

    def make(num_blocks=256, block_size=4, max_num_seqs=64, max_num_batched_tokens=512, pp=1, dp=1,
             prefix=True, max_model_len=200):
        cfg = EngineConfig(model="toy", block_size=block_size, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=max_num_batched_tokens, pipeline_parallel_size=pp,
                           data_parallel_size=dp, enable_prefix_caching=prefix)
        ex = ToyExecutor(num_blocks, block_size, num_replicas=dp, max_in_flight=pp)
        eng = LLMEngine(cfg, ex, TOKENIZER, [EOS], max_model_len)
        made.append((eng, ex))
        return eng

    yield make
    for eng, ex in made:
        assert not eng.has_unfinished_requests(), "test left requests running"
        assert eng.all_blocks_free(), "KV blocks leaked"
        for sched, rank_cache in zip(eng.schedulers, ex.seqs, strict=True):
            # the ranks hold exactly the sequences whose drop is still pending
            assert set(rank_cache) == set(sched._dropped_seq_ids)


def run(eng: LLMEngine, max_steps=100000):
    outs = {}
    steps = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        steps += 1
        assert steps < max_steps, "engine did not finish"
    return outs


def mixed_prompts(n, seed=0, lo=1, hi=60):
    rng = random.Random(seed)
    return [[rng.randrange(1, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def expected(prompts, max_tokens, max_len=200):
    return [reference(p, m, max_len=max_len) for p, m in zip(prompts, max_tokens, strict=True)]


def check(outs, prompts, max_tokens, max_len=200):
    for i, (toks, lps, reason) in enumerate(expected(prompts, max_tokens, max_len)):
        c = outs[str(i)].outputs[0]
        assert c.token_ids == toks, f"request {i}"
        assert c.cumulative_logprob == pytest.approx(sum(lps))
        assert c.finish_reason == reason


def submit(eng, prompts, max_tokens, **kw):
    for i, (p, m) in enumerate(zip(prompts, max_tokens, strict=True)):
        eng.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=m, **kw))


PROMPTS = mixed_prompts(40)
MAX_TOKENS = [random.Random(i).randint(1, 30) for i in range(40)]

LAYOUTS = {
    "roomy": {},
    "chunked_prefill": {"max_num_batched_tokens": 7},
    "preemption": {"num_blocks": 40},
    "preemption_chunked_tiny_seqs": {"num_blocks": 36, "max_num_batched_tokens": 5, "max_num_seqs": 3},
    "pipeline_3_micro_batches": {"pp": 3, "max_num_batched_tokens": 24},
    "data_parallel_3": {"dp": 3, "num_blocks": 50},
    "no_prefix_cache": {"prefix": False, "num_blocks": 45},
    "block_size_1": {"block_size": 1, "num_blocks": 200},
    "one_seq_at_a_time": {"max_num_seqs": 1},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_40_mixed_prompts_same_output_under_every_layout(make_engine, layout):
    eng = make_engine(**LAYOUTS[layout])
    submit(eng, PROMPTS, MAX_TOKENS)
    check(run(eng), PROMPTS, MAX_TOKENS)
    if "preemption" in layout:
        assert eng.num_preemptions > 0
    if layout == "chunked_prefill":
        ex = eng.executor
        assert all(sum(s.num_tokens for s in call) <= 7 for call in ex.calls)
        assert any(not x.sample for call in ex.calls for s in call for x in s.scheduled)  # real chunks
    if layout == "pipeline_3_micro_batches":
        assert max(len(c) for c in eng.executor.calls) == 3
    if layout == "data_parallel_3":
        assert {s.replica for c in eng.executor.calls for s in c} == {0, 1, 2}
        assert all(len(c) <= 3 for c in eng.executor.calls)   # one execute per step for all replicas


def test_requests_arriving_while_others_decode(make_engine):
    eng = make_engine(max_num_batched_tokens=16, num_blocks=60)
    outs = {}
    rng = random.Random(3)
    pending = list(range(40))
    step = 0
    while pending or eng.has_unfinished_requests():
        for _ in range(rng.randint(0, 3)):
            if pending:
                i = pending.pop(0)
                eng.add_request(str(i), PROMPTS[i], SamplingParams(temperature=0, max_tokens=MAX_TOKENS[i]))
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        step += 1
    check(outs, PROMPTS, MAX_TOKENS)
    assert eng.executor.max_seqs_per_step > 5


def test_streaming_outputs_are_cumulative_and_monotonic(make_engine):
    eng = make_engine()
    eng.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=12, logprobs=2))
    prev = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            toks = o.outputs[0].token_ids
            assert toks[:len(prev)] == prev and len(toks) == len(prev) + 1
            assert len(o.outputs[0].logprobs) == len(toks)
            prev = toks


def test_shared_system_prompt_hits_prefix_cache(make_engine):
    eng = make_engine(block_size=4)
    system = mixed_prompts(1, seed=9, lo=33, hi=33)[0]
    prompts = [system + p for p in mixed_prompts(8, seed=10, lo=1, hi=9)]
    mt = [8] * 8
    eng.add_request("0", prompts[0], SamplingParams(temperature=0, max_tokens=8))
    first = run(eng)
    for i in range(1, 8):
        eng.add_request(str(i), prompts[i], SamplingParams(temperature=0, max_tokens=8))
    outs = run(eng) | first
    check(outs, prompts, mt)
    assert eng.prefix_hit_tokens >= 7 * 32
    assert all(outs[str(i)].num_cached_tokens == 32 for i in range(1, 8))


def test_preempted_sequence_recomputes_as_new_under_fresh_id(make_engine):
    eng = make_engine(num_blocks=12, block_size=4, max_num_batched_tokens=64)
    prompts = mixed_prompts(4, seed=5, lo=10, hi=12)
    submit(eng, prompts, [20] * 4, ignore_eos=True)
    outs = run(eng)
    for i, p in enumerate(prompts):
        toks, _, _ = reference(p, 20, ignore_eos=True)
        assert outs[str(i)].outputs[0].token_ids == toks
    assert eng.num_preemptions >= 2
    dropped = [sid for c in eng.executor.calls for s in c for sid in s.finished_seq_ids]
    assert len(dropped) == len(set(dropped))


def test_n_sequences_share_prompt_blocks_and_use_seed_offsets(make_engine):
    eng = make_engine(block_size=4)
    prompt = mixed_prompts(1, seed=11, lo=21, hi=21)[0]
    eng.add_request("r", prompt, SamplingParams(n=4, temperature=1.0, seed=100, max_tokens=10))
    out = run(eng)["r"]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    for c in out.outputs:
        toks, lps, _ = reference(prompt, 10, seed=100 + c.index)
        assert c.token_ids == toks
        assert c.cumulative_logprob == pytest.approx(sum(lps))
    assert eng.prefix_hit_tokens == 3 * 20        # 5 full prompt blocks reused by each sibling
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_seeded_sampling_alone_equals_in_a_batch(make_engine):
    p = SamplingParams(temperature=0.8, seed=42, max_tokens=15)
    alone = make_engine()
    alone.add_request("x", PROMPTS[0], p)
    a = run(alone)["x"].outputs[0].token_ids
    batched = make_engine(max_num_batched_tokens=9, num_blocks=40)
    submit(batched, PROMPTS[1:20], MAX_TOKENS[1:20])
    batched.add_request("x", PROMPTS[0], p)
    assert run(batched)["x"].outputs[0].token_ids == a


def test_abort_running_and_waiting_requests(make_engine):
    eng = make_engine(max_num_seqs=2)
    submit(eng, PROMPTS[:6], [30] * 6, ignore_eos=True)
    for _ in range(3):
        eng.step()
    eng.abort_request("0")          # running
    eng.abort_request("5")          # still waiting
    eng.abort_request("nope")       # unknown: ignored
    outs = run(eng)
    for rid in ("0", "5"):
        assert outs[rid].finished and outs[rid].outputs[0].finish_reason == "abort"
    assert len(outs["5"].outputs[0].token_ids) == 0
    for i in (1, 2, 3, 4):
        assert outs[str(i)].outputs[0].token_ids == reference(PROMPTS[i], 30, ignore_eos=True)[0]


def test_too_long_prompt_rejected_without_affecting_others(make_engine):
    eng = make_engine(max_model_len=70, num_blocks=100)
    submit(eng, PROMPTS[:3], MAX_TOKENS[:3])
    with pytest.raises(PromptTooLongError) as e:
        eng.add_request("long", [1] * 70, SamplingParams())
    assert "70 tokens" in str(e.value) and "max_model_len is 70" in str(e.value)
    assert isinstance(e.value, ValueError) and (e.value.prompt_len, e.value.max_len) == (70, 70)
    check(run(eng), PROMPTS[:3], MAX_TOKENS[:3], max_len=70)


def test_prompt_that_can_never_fit_the_kv_cache_is_rejected(make_engine):
    eng = make_engine(num_blocks=4, block_size=4, max_model_len=100)
    with pytest.raises(PromptTooLongError, match=r"16 tokens.*at most 16 tokens"):
        eng.add_request("x", list(range(1, 17)), SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        eng.add_request("y", [], SamplingParams())
    with pytest.raises(ValueError, match=f"token id {VOCAB} is outside"):
        eng.add_request("y", [1, VOCAB], SamplingParams())
    eng.add_request("z", list(range(1, 15)), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    out = run(eng)["z"].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 2   # capped by the 16-token cache


def test_max_model_len_caps_output(make_engine):
    eng = make_engine(max_model_len=20)
    eng.add_request("a", list(range(1, 16)), SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    out = run(eng)["a"].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_duplicate_request_id_rejected(make_engine):
    eng = make_engine()
    eng.add_request("a", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already"):
        eng.add_request("a", [1, 2], SamplingParams())
    run(eng)


def _find_prompt_hitting(token, within=12):
    for seed in range(2000):
        p = mixed_prompts(1, seed=seed, lo=3, hi=8)[0]
        toks, _, _ = reference(p, within, ignore_eos=True)
        if token in toks[1:within - 2]:
            return p, toks.index(token, 1)
    raise AssertionError("no prompt found")


def test_eos_stops_and_ignore_eos_continues(make_engine):
    p, k = _find_prompt_hitting(EOS)
    eng = make_engine()
    eng.add_request("stop", p, SamplingParams(temperature=0, max_tokens=12))
    eng.add_request("ignore", p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    outs = run(eng)
    s = outs["stop"].outputs[0]
    assert s.token_ids[-1] == EOS and len(s.token_ids) == k + 1 and s.finish_reason == "stop"
    assert s.stop_reason is None and "<eos>" not in s.text
    assert len(outs["ignore"].outputs[0].token_ids) == 12


def test_stop_token_ids_and_min_tokens(make_engine):
    p, k = _find_prompt_hitting(7)
    eng = make_engine()
    eng.add_request("a", p, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[7], ignore_eos=True))
    eng.add_request("b", p, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[7], ignore_eos=True,
                                           min_tokens=k + 2))
    outs = run(eng)
    a = outs["a"].outputs[0]
    assert a.token_ids[-1] == 7 and a.stop_reason == 7 and a.finish_reason == "stop"
    b = outs["b"].outputs[0]
    assert len(b.token_ids) >= k + 2
    assert b.token_ids == reference(p, 12, ignore_eos=True, stop_token_ids=[7], min_tokens=k + 2)[0]
    assert 7 not in b.token_ids[:k + 1]


def test_stop_string_spanning_tokens_truncates_text(make_engine):
    p = [5, 6, 7]
    toks, _, _ = reference(p, 12, ignore_eos=True)
    full = TOKENIZER.decode(toks)
    stop = full[4:7]                       # spans three one-character tokens
    eng = make_engine()
    eng.add_request("a", p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]))
    eng.add_request("b", p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop,
                                           include_stop_str_in_output=True))
    outs = run(eng)
    i = full.find(stop)
    assert outs["a"].outputs[0].text == full[:i] and outs["a"].outputs[0].stop_reason == stop
    assert outs["b"].outputs[0].text == full[:i + len(stop)]
    # generation ends with the token that completed the stop string
    n = next(j for j in range(1, 13) if stop in TOKENIZER.decode(toks[:j]))
    assert outs["a"].outputs[0].token_ids == toks[:n] == outs["b"].outputs[0].token_ids


def test_logprobs_hold_sampled_token_and_top_k(make_engine):
    eng = make_engine()
    eng.add_request("a", [3, 4], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True))
    eng.add_request("b", [3, 4], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    outs = run(eng)
    a = outs["a"].outputs[0]
    toks, lps, _ = reference([3, 4], 5, ignore_eos=True)
    assert len(a.logprobs) == 5
    for d, t, lp in zip(a.logprobs, toks, lps, strict=True):
        assert d[t] == pytest.approx(lp) and len(d) == 3
    assert outs["b"].outputs[0].logprobs is None


def test_text_prompts_are_tokenized(make_engine):
    eng = make_engine()
    eng.add_request("a", "hello world", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    out = run(eng)["a"]
    assert out.prompt == "hello world" and out.prompt_token_ids == TOKENIZER.encode("hello world").ids
    assert out.outputs[0].token_ids == reference(out.prompt_token_ids, 4, ignore_eos=True)[0]


def test_add_from_another_thread_while_stepping(make_engine):
    eng = make_engine(max_num_batched_tokens=8)
    done = threading.Event()

    def producer():
        for i in range(20):
            eng.add_request(str(i), PROMPTS[i], SamplingParams(temperature=0, max_tokens=MAX_TOKENS[i]))
        done.set()

    t = threading.Thread(target=producer)
    t.start()
    outs = {}
    while not done.is_set() or eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
    t.join()
    check(outs, PROMPTS[:20], MAX_TOKENS[:20])


def test_one_execute_call_per_step(make_engine):
    """Counted by the test around each step() (not by the engine's own counter, which sits beside the call)."""
    eng = make_engine(dp=2, pp=2, max_num_batched_tokens=64)
    submit(eng, PROMPTS[:10], MAX_TOKENS[:10])
    calls = eng.executor.calls
    while eng.has_unfinished_requests():
        before = len(calls)
        eng.step()
        assert len(calls) - before == 1, "a step with work must make exactly one execute call"
    # one call carries both replicas' micro-batches (2 stages each), not one call per replica or stage
    assert any({s.replica for s in c} == {0, 1} and len(c) == 4 for c in calls)
