"""Engine behaviours through REAL sharded Ray workers, each compared with an independent expectation.

The in-process tests (tests/engine) prove these behaviours at one rank; here the same engine
drives TP x PP workers over gloo, where a wrong block table on one rank, a micro-batch sent to the
wrong stage or a sampler fed different logits would show. To stay inside the CI budget, each
engine instance carries several behaviours:

- TP=2 x PP=2 tiny Llama with a 16-token step budget and a small KV pool: chunked prefill,
  preemption with pipeline stages, prefix-cache hits, n > 1, prompt_logprobs and seeded sampling —
  greedy tokens equal HF `generate` (logprobs and prompt logprobs within 1e-4), seeded tokens equal
  a TP=1 in-process engine's.
  (The issue asks for TP=3 / PP=2; the tiny fixtures have 8 heads, so TP=2 x PP=2 stands in.)
- 8 ranks, TP=4 x PP=2, on a tiny Mistral with a sliding window (8) shorter than the prompts and
  an uneven layer_split (3, 1): greedy equals HF; seeded sampling equals TP=1 in-process.
- bfloat16 at TP=2: agreement with HF float32 (not equality): >= 80% of tokens are its argmax and
  none is more than 0.5 nats below it; logprob error mean < 0.15, max < 0.75.
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from cluster.llm import LLM
from scheduler.sampling_params import SamplingParams
from tests.fixtures.reference import hf_greedy, hf_prefill_logits

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

VOCAB = 509
TOL = 1e-4


def prompts_of(n: int, seed: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0, ignore_eos=True, **kw)


def run(llm: LLM, prompts: list[list[int]], params) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def assert_greedy_equals_hf(model_dir, prompts, outs, max_tokens: int) -> None:
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        want, want_lps = hf_greedy(str(model_dir), p, max_tokens)
        for c in o.outputs:
            assert c.token_ids == want, f"prompt {i} (len {len(p)}), output {c.index}: tokens differ from HF"
            got_lps = [d[t] for d, t in zip(c.logprobs, c.token_ids, strict=True)]
            worst = max(abs(a - b) for a, b in zip(got_lps, want_lps, strict=True))
            assert worst < TOL, f"prompt {i}: logprobs differ from HF by {worst:.2e}"


def assert_prompt_logprobs_equal_hf(model_dir, prompt: list[int], out, k: int) -> None:
    """vLLM's layout: None for the first token, then {actual token: lp, top-k: lp}; values equal HF's."""
    want = torch.log_softmax(hf_prefill_logits(model_dir, prompt), dim=-1)
    got = out.prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    for i in range(1, len(prompt)):
        top = want[i - 1].topk(k)
        expect = {prompt[i]: want[i - 1, prompt[i]].item(), **dict(zip(top.indices.tolist(), top.values.tolist()))}
        assert set(got[i]) == set(expect), f"position {i}: token ids {sorted(got[i])} != {sorted(expect)}"
        worst = max(abs(got[i][t] - v) for t, v in expect.items())
        assert worst < TOL, f"position {i}: prompt logprobs differ from HF by {worst:.2e}"


def assert_clean(llm: LLM) -> None:
    assert not llm.engine.has_unfinished_requests() and llm.engine.all_blocks_free()


SEEDED = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=1000 + i, max_tokens=12, ignore_eos=True)
          for i in range(3)]


@pytest.fixture(scope="module")
def tp1_seeded():
    """Seeded outputs of an in-process TP=1 engine, per model folder: what every layout must reproduce."""
    cache = {}

    def get(model_dir, prompts):
        key = str(model_dir)
        if key not in cache:
            with LLM(key) as llm:
                cache[key] = [o.outputs[0].token_ids for o in run(llm, prompts, SEEDED)]
        return cache[key]
    return get


def test_tp2_pp2_chunked_prefill_preemption_prefix_cache_n_and_seeds(tiny_llama_dir, ray_local, tp1_seeded):
    with LLM(str(tiny_llama_dir), tensor_parallel_size=2, pipeline_parallel_size=2, address=ray_local,
             max_num_batched_tokens=16, block_size=4, num_kv_blocks=40) as llm:
        assert len(llm.executor.node_ids) == 4
        # chunked prefill (prompts of 20..40 tokens, 16-token budget) + preemption (40 blocks of 4 tokens
        # cannot hold 6 sequences of up to 56 tokens) across 2 pipeline stages
        prompts = prompts_of(6, seed=1, lo=20, hi=40)
        outs = run(llm, prompts, greedy(16))
        assert llm.engine.num_preemptions > 0, "the pool was meant to force preemption"
        assert_greedy_equals_hf(tiny_llama_dir, prompts, outs, 16)
        assert_clean(llm)
        # prefix-cache hits: a shared 24-token prefix (6 full blocks) computed once
        system = prompts_of(1, seed=2, lo=24, hi=24)[0]
        shared = [system + tail for tail in prompts_of(3, seed=3, lo=2, hi=6)]
        first = run(llm, shared[:1], greedy(8))
        hits_before = llm.engine.prefix_hit_tokens
        rest = run(llm, shared[1:], greedy(8))
        assert all(o.num_cached_tokens == 24 for o in rest)
        assert llm.engine.prefix_hit_tokens - hits_before >= 2 * 24
        assert_greedy_equals_hf(tiny_llama_dir, shared, first + rest, 8)
        # prompt_logprobs: a prompt of 26+ tokens in 16-token chunks, its cached prefix recomputed (not
        # served from the cache), vocabulary-sharded logits gathered on the last stage; n=2 reports once
        (scored,) = run(llm, shared[:1], greedy(2, n=2, prompt_logprobs=3))
        assert scored.num_cached_tokens == 0 and scored.outputs[1].token_ids == first[0].outputs[0].token_ids[:2]
        assert_prompt_logprobs_equal_hf(tiny_llama_dir, shared[0], scored, 3)
        # n > 1: greedy siblings all equal HF; seeded siblings equal separate requests with seed + i
        p = prompts_of(1, seed=4, lo=10, hi=10)
        (both,) = run(llm, p, greedy(8, n=3))
        assert [c.index for c in both.outputs] == [0, 1, 2]
        assert_greedy_equals_hf(tiny_llama_dir, p, [both], 8)
        (pair,) = run(llm, p, SamplingParams(n=2, temperature=1.0, seed=77, max_tokens=8, ignore_eos=True))
        alone = run(llm, p * 2, [SamplingParams(temperature=1.0, seed=77 + i, max_tokens=8, ignore_eos=True)
                                 for i in range(2)])
        assert [c.token_ids for c in pair.outputs] == [a.outputs[0].token_ids for a in alone]
        # seeded sampling: the same tokens as one in-process rank
        seeded_prompts = prompts_of(3, seed=5, lo=5, hi=15)
        got = [o.outputs[0].token_ids for o in run(llm, seeded_prompts, SEEDED)]
        assert got == tp1_seeded(tiny_llama_dir, seeded_prompts)
        assert len({tuple(t) for t in got}) == 3
        assert_clean(llm)


@pytest.fixture(scope="module")
def mistral_sliding_dir(tiny_mistral_dir, tmp_path_factory):
    """The tiny Mistral with sliding_window=8: shorter than every prompt below."""
    path = tmp_path_factory.mktemp("mistral_sw") / "model"
    shutil.copytree(tiny_mistral_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["sliding_window"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_8_ranks_tp4_pp2_uneven_split_mistral_sliding_window(mistral_sliding_dir, tiny_mistral_dir, ray_local,
                                                             tp1_seeded):
    prompts = prompts_of(3, seed=6, lo=12, hi=30)
    # the window really changes the result (else this test could not tell a window from none)
    assert hf_greedy(str(mistral_sliding_dir), prompts[0], 10)[0] != hf_greedy(str(tiny_mistral_dir),
                                                                                prompts[0], 10)[0]
    with LLM(str(mistral_sliding_dir), tensor_parallel_size=4, pipeline_parallel_size=2, layer_split=(3, 1),
             address=ray_local, block_size=4, max_num_batched_tokens=32) as llm:
        assert len(llm.executor.node_ids) == 8
        assert llm.executor.plan.layers(0) == range(0, 3) and llm.executor.plan.layers(1) == range(3, 4)
        assert_greedy_equals_hf(mistral_sliding_dir, prompts, run(llm, prompts, greedy(10)), 10)
        seeded_prompts = prompts_of(3, seed=7, lo=5, hi=15)
        got = [o.outputs[0].token_ids for o in run(llm, seeded_prompts, SEEDED)]
        assert got == tp1_seeded(mistral_sliding_dir, seeded_prompts)
        assert_clean(llm)


def test_bf16_at_tp2_agrees_with_hf(tiny_llama_gqa_dir, ray_local):
    """Agreement, not equality: bf16 flips near-ties (HF's own bf16 flips the same ones on this model:
    choice gaps 0.28 / 0.015 / 0.16 nats at the same positions, measured once by hand). The tiny
    model's sharp logits make bf16 logprob errors larger than a real model's; bounds have ~1.5x headroom."""
    prompts = prompts_of(3, seed=8, lo=4, hi=20)
    with LLM(str(tiny_llama_gqa_dir), tensor_parallel_size=2, dtype="bfloat16", address=ray_local) as llm:
        outs = run(llm, prompts, greedy(8))
        assert_clean(llm)
    gaps, lp_diffs = [], []
    for p, o in zip(prompts, outs, strict=True):
        c = o.outputs[0]
        ref = torch.log_softmax(hf_prefill_logits(str(tiny_llama_gqa_dir), p + c.token_ids)[len(p) - 1:-1], -1)
        for j, t in enumerate(c.token_ids):
            gaps.append(float(ref[j].max() - ref[j, t]))     # 0 when bf16 picked float32's argmax
            lp_diffs.append(abs(c.logprobs[j][t] - float(ref[j, t])))
    n = len(gaps)
    print(f"bf16 TP=2 vs HF: {sum(g == 0 for g in gaps)}/{n} float32 argmax, worst gap {max(gaps):.3f} nats, "
          f"logprob diff mean {sum(lp_diffs) / n:.3f} max {max(lp_diffs):.3f}")
    assert max(gaps) < 0.5 and sum(g == 0 for g in gaps) >= 0.8 * n
    assert sum(lp_diffs) / n < 0.15 and max(lp_diffs) < 0.75
    assert max(lp_diffs) > 1e-3, "bf16 should not be bit-identical to float32: was bf16 really used?"
