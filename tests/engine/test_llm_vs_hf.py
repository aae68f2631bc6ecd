"""`LLM` (engine + LocalExecutor + model runner) against Hugging Face `generate` in float32.

Greedy tokens must be identical and per-token logprobs within 1e-4, whatever the batching:
requests arriving while others decode, chunked prefill (small token budget), preemption (small
block pool), prefix-cache hits. Every test ends with every KV block free.
"""

from __future__ import annotations

import random

import pytest

from cluster import LLM, BeamSearchParams, PromptTooLongError, SamplingParams
from tests.fixtures.reference import hf_beam_search, hf_greedy

TINY_MODELS = ["tiny_llama_dir", "tiny_llama_gqa_dir", "tiny_gpt2_dir"]
TINY_VOCAB = 509            # tests/fixtures/tiny_models.py; ids 0 (eos/bos) and 1 (pad) are special
LOGPROB_TOL = 1e-4


@pytest.fixture
def make_llm():
    """Build LLMs; at teardown each must have no request left and every KV block free."""
    made: list[LLM] = []

    def make(model_dir, **kw) -> LLM:
        llm = LLM(str(model_dir), **kw)
        made.append(llm)
        return llm

    yield make
    try:
        for llm in made:
            assert not llm.engine.has_unfinished_requests(), "requests left running"
            assert llm.engine.all_blocks_free(), "KV blocks leaked"
    finally:
        for llm in made:
            llm.shutdown()


def token_prompts(n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, TINY_VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0)


def assert_same_as_hf(model_dir, outputs, max_tokens: list[int]) -> None:
    for i, (o, m) in enumerate(zip(outputs, max_tokens, strict=True)):
        want_tokens, want_lps = hf_greedy(model_dir, o.prompt_token_ids, m, stop_at_eos=True)
        c = o.outputs[0]
        assert c.token_ids == list(want_tokens), f"prompt {i}: tokens differ from HF"
        got_lps = [d[t] for d, t in zip(c.logprobs, c.token_ids, strict=True)]
        worst = max(abs(a - b) for a, b in zip(got_lps, want_lps, strict=True))
        assert worst < LOGPROB_TOL, f"prompt {i}: logprob off by {worst}"
        assert c.cumulative_logprob == pytest.approx(sum(want_lps), abs=LOGPROB_TOL * len(want_lps))


# ------------------------------------------------------------------ tiny random models


@pytest.mark.parametrize("model", TINY_MODELS)
def test_32_mixed_length_prompts_greedy_equals_hf(request, make_llm, model):
    """32 prompts of 1..120 tokens in one call: continuous batching plus chunked prefill (budget 64)."""
    model_dir = request.getfixturevalue(model)
    llm = make_llm(model_dir, max_num_batched_tokens=64, block_size=8, max_num_seqs=16)
    prompts = token_prompts(32, seed=1, lo=1, hi=120)
    max_tokens = [random.Random(i).randint(4, 24) for i in range(32)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], [greedy(m) for m in max_tokens], use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert_same_as_hf(model_dir, outs, max_tokens)
    assert llm.engine.max_batch_seqs >= 8
    print(f"{model}: largest batch {llm.engine.max_batch_seqs} sequences, {llm.engine.num_preemptions} preemptions")


def test_requests_arrive_while_others_decode(tiny_llama_dir, make_llm):
    llm = make_llm(tiny_llama_dir, max_num_batched_tokens=32, block_size=4)
    prompts = token_prompts(12, seed=2, lo=3, hi=50)
    eng, done, pending, step = llm.engine, {}, list(range(12)), 0
    while pending or eng.has_unfinished_requests():
        if pending and step % 3 == 0:           # one new request every third step
            i = pending.pop(0)
            eng.add_request(str(i), prompts[i], greedy(16))
        for o in eng.step():
            if o.finished:
                done[int(o.request_id)] = o
        step += 1
    assert_same_as_hf(tiny_llama_dir, [done[i] for i in range(12)], [16] * 12)


def test_preemption_with_a_small_block_pool_keeps_outputs(tiny_llama_dir, make_llm):
    llm = make_llm(tiny_llama_dir, num_kv_blocks=24, block_size=4, max_num_batched_tokens=48)
    prompts = token_prompts(8, seed=3, lo=20, hi=40)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(24), use_tqdm=False)
    assert llm.engine.num_preemptions > 0
    assert_same_as_hf(tiny_llama_dir, outs, [24] * 8)
    print(f"preemption test: {llm.engine.num_preemptions} preemptions, largest batch {llm.engine.max_batch_seqs}")


def test_shared_system_prompt_hits_prefix_cache(tiny_llama_dir, make_llm):
    llm = make_llm(tiny_llama_dir, block_size=8)
    system = token_prompts(1, seed=4, lo=40, hi=40)[0]
    prompts = [system + tail for tail in token_prompts(6, seed=5, lo=1, hi=12)]
    first = llm.generate({"prompt_token_ids": prompts[0]}, greedy(12), use_tqdm=False)
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], greedy(12), use_tqdm=False)
    assert all(o.num_cached_tokens == 40 for o in rest)
    assert llm.engine.prefix_hit_tokens >= 5 * 40
    assert_same_as_hf(tiny_llama_dir, first + rest, [12] * 6)


def test_seeded_sampling_same_alone_and_in_a_batch(tiny_llama_dir, make_llm):
    llm = make_llm(tiny_llama_dir, max_num_batched_tokens=32, block_size=4)
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234, max_tokens=16)
    prompt = {"prompt_token_ids": token_prompts(1, seed=6, lo=20, hi=20)[0]}
    alone = llm.generate(prompt, p, use_tqdm=False)[0].outputs[0].token_ids
    others = [{"prompt_token_ids": q} for q in token_prompts(9, seed=7, lo=5, hi=60)]
    batch = llm.generate(others[:5] + [prompt] + others[5:], [greedy(16)] * 5 + [p] + [greedy(16)] * 4,
                         use_tqdm=False)
    assert batch[5].outputs[0].token_ids == alone
    assert len(alone) == 16 or alone[-1] in llm.eos_token_ids


def test_n_greedy_outputs_equal_hf_and_share_the_prompt(tiny_llama_dir, make_llm):
    llm = make_llm(tiny_llama_dir, block_size=4)
    prompt = token_prompts(1, seed=8, lo=18, hi=18)[0]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(n=3, temperature=0, max_tokens=10, logprobs=0),
                       use_tqdm=False)[0]
    want, _ = hf_greedy(tiny_llama_dir, prompt, 10, stop_at_eos=True)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == list(want) for c in out.outputs)
    assert llm.engine.prefix_hit_tokens == 2 * 16      # siblings reuse the 4 full prompt blocks


def test_n_seeded_outputs_equal_separate_requests_with_seed_offsets(tiny_llama_dir, make_llm):
    llm = make_llm(tiny_llama_dir)
    prompt = {"prompt_token_ids": token_prompts(1, seed=9, lo=10, hi=10)[0]}
    both = llm.generate(prompt, SamplingParams(n=2, temperature=1.0, seed=77, max_tokens=12), use_tqdm=False)[0]
    for i in range(2):
        alone = llm.generate(prompt, SamplingParams(temperature=1.0, seed=77 + i, max_tokens=12), use_tqdm=False)
        assert both.outputs[i].token_ids == alone[0].outputs[0].token_ids


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_gpt2_dir"])
def test_beam_search_equals_hf_num_beams_4(request, make_llm, model):
    model_dir = request.getfixturevalue(model)
    llm = make_llm(model_dir, block_size=4)
    prompts = token_prompts(3, seed=10, lo=4, hi=30)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts], BeamSearchParams(beam_width=4, max_tokens=8))
    for p, o in zip(prompts, outs, strict=True):
        want = hf_beam_search(model_dir, p, 4, 8)          # all 4 beams, best first
        assert [s.output_token_ids for s in o.sequences] == want
        assert o.sequences[0].tokens[:len(p)] == p


# Prompts (token_prompts-style, seeds below, lengths 3..20 from random.Random(seed)) whose HF beams end on
# EOS at different lengths on tiny_llama_dir, found by searching seeds 0..300 with num_beams=4,
# max_new_tokens=10: so EOS handling and the length normalisation really decide the ranking.
EOS_BEAM_SEEDS = [24, 61, 40]


def eos_beam_prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, TINY_VOCAB) for _ in range(rng.randint(3, 20))]


def test_beam_search_finishing_on_eos_at_different_lengths_equals_hf(tiny_llama_dir, make_llm):
    """length_penalty 1.0, 0.5 and 2.0 on prompts whose beams end on EOS at different lengths."""
    llm = make_llm(tiny_llama_dir, block_size=4)
    prompts = [eos_beam_prompt(s) for s in EOS_BEAM_SEEDS]
    got = {}
    for lp in (1.0, 0.5, 2.0):
        outs = llm.beam_search([{"prompt_token_ids": p} for p in prompts],
                               BeamSearchParams(beam_width=4, max_tokens=10, length_penalty=lp))
        got[lp] = [[s.output_token_ids for s in o.sequences] for o in outs]
        stopped, lengths = 0, set()
        for p, o, beams in zip(prompts, outs, got[lp], strict=True):
            assert beams == hf_beam_search(tiny_llama_dir, p, 4, 10, length_penalty=lp), f"lp={lp} prompt {p}"
            for s in o.sequences:
                assert (s.finish_reason == "stop") == (s.output_token_ids[-1] in llm.eos_token_ids)
                n = len(s.output_token_ids)
                assert s.score == pytest.approx(s.cum_logprob / n ** lp, rel=1e-6)
                stopped += s.finish_reason == "stop"
                lengths.add(n)
        if lp <= 1.0:
            assert stopped >= 1 and len(lengths) >= 2, f"lp={lp}: no EOS beam at a different length"
    # the penalty decides the result: a long-favouring 2.0 drops the short EOS beams that 0.5 keeps
    assert got[2.0] != got[1.0] and got[0.5] != got[2.0]


def test_too_long_prompt_rejected_while_others_complete(tiny_llama_dir, make_llm):
    llm = make_llm(tiny_llama_dir, max_model_len=64)
    ok = token_prompts(3, seed=11, lo=5, hi=30)
    prompts = [{"prompt_token_ids": p} for p in ok[:2]] + [{"prompt_token_ids": [5] * 80}] + \
              [{"prompt_token_ids": ok[2]}]
    with pytest.raises(PromptTooLongError) as e:
        llm.generate(prompts, greedy(8), use_tqdm=False)
    msg = str(e.value)
    assert "prompt 2" in msg and "80 tokens" in msg and "max_model_len is 64" in msg
    assert set(e.value.rejected) == {2} and e.value.outputs[2] is None
    done = [e.value.outputs[i] for i in (0, 1, 3)]
    assert all(o.finished for o in done)
    assert_same_as_hf(tiny_llama_dir, done, [8] * 3)


def test_text_prompts_and_chat(tiny_llama_dir, make_llm):
    llm = make_llm(tiny_llama_dir)
    outs = llm.generate(["The quick brown fox", "Once upon a time"], greedy(6), use_tqdm=False)
    assert outs[0].prompt == "The quick brown fox"
    assert outs[0].prompt_token_ids == llm.get_tokenizer()("The quick brown fox")["input_ids"]
    assert_same_as_hf(tiny_llama_dir, outs, [6, 6])
    chat = llm.chat([{"role": "user", "content": "Hello there"}], greedy(6), use_tqdm=False)[0]
    assert chat.prompt.endswith("<|assistant|>\n") and len(chat.outputs[0].token_ids) >= 1
    with pytest.raises(ValueError, match="2 sampling_params for 3 prompts"):
        llm.generate(["a", "b", "c"], [greedy(2), greedy(2)], use_tqdm=False)


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        LLM(str(tmp_path / "nope"))


# ------------------------------------------------------------------ SmolLM2 (the bundled real model)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    llm = LLM(str(smollm2_dir), max_num_batched_tokens=256, block_size=16, max_num_seqs=32)
    yield llm
    try:
        assert llm.engine.all_blocks_free()
    finally:
        llm.shutdown()


SMOL_TOPICS = ["the ocean", "a small robot", "bread", "the moon landing", "trains", "a lighthouse keeper",
               "python programming", "autumn leaves"]


@pytest.mark.slow
def test_smollm2_32_prompts_greedy_equals_hf(smollm2_dir, smol):
    rng = random.Random(12)
    prompts = []
    for i in range(32):
        topic = SMOL_TOPICS[i % len(SMOL_TOPICS)]
        words = " ".join(rng.choice(["very", "quite", "rather", "truly"]) for _ in range(rng.randint(0, 40)))
        prompts.append(f"Write one {words} short sentence about {topic}.")
    max_tokens = [16 + (i % 2) * 4 for i in range(32)]                     # 16 or 20
    outs = smol.generate(prompts, [greedy(m) for m in max_tokens], use_tqdm=False)
    assert_same_as_hf(smollm2_dir, outs, max_tokens)
    assert smol.engine.max_batch_seqs >= 16
    print(f"smollm2 32 prompts: largest batch {smol.engine.max_batch_seqs} sequences")


@pytest.mark.slow
def test_smollm2_system_prompt_prefix_hits(smollm2_dir, smol):
    system = "You are a careful assistant who answers in one short sentence. " * 3
    convs = [[{"role": "system", "content": system}, {"role": "user", "content": q}]
             for q in ("What is rain?", "Name a color.", "Why do cats purr?")]
    before = smol.engine.prefix_hit_tokens
    first = smol.chat(convs[0], greedy(8), use_tqdm=False)
    rest = smol.chat(convs[1:], greedy(8), use_tqdm=False)
    assert smol.engine.prefix_hit_tokens - before >= 2 * 32
    assert all(o.num_cached_tokens >= 32 for o in rest)
    assert all(o.prompt_token_ids[:32] == first[0].prompt_token_ids[:32] for o in rest)   # the shared prefix
    assert_same_as_hf(smollm2_dir, first + rest, [8] * 3)
