"""Uneven tensor parallelism over plain gloo processes computes what `transformers` computes.

Three tiny models whose sizes 4 does not divide, at T=4 (PP with uneven TP: the SmolLM2 Ray test):

- Llama, 6 heads / 2 KV heads: query heads split 2, 2, 1, 1; KV heads 0 and 1 are each
  replicated (KV head 0 on ranks 0 and 1, KV head 1 on ranks 1, 2 and 3), and rank 1 holds
  both for its two query heads, one of each group;
- Llama, 10 heads / 2 KV heads (groups of 5): heads 3, 3, 2, 2; rank 1's query heads 3, 4, 5
  use KV heads 0, 0, 1 - unequal groups, which SDPA's grouped mode cannot express, so K/V are
  expanded per query head;
- GPT-2, 6 heads (fused Conv1D c_attn): heads 2, 2, 1, 1, no replication.

All have intermediate size 90 (columns 23, 23, 22, 22) and vocabulary 701 (padded to 704 =
11 blocks of 64: rows 192, 192, 192, 128, gathered with padding). Prefill logits within 1e-4 of
HF's, then 12 greedy tokens identical to HF `generate`, logprobs within 1e-4.
"""

from __future__ import annotations

import pytest

from sharding.plan import ShardPlan, load_hf_config
from tests.distributed.harness import Job, assert_matches_hf, driver_rank, hf_references, run_layout
from tests.fixtures.tiny_models import build_tiny_gpt2, build_tiny_llama

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

PROMPTS = [[5], [17, 3, 99, 250, 8], [(7 * i) % 300 + 3 for i in range(21)]]
NEW_TOKENS = 12
UNEVEN = {"hidden_size": 96, "intermediate_size": 90, "vocab_size": 701}


@pytest.fixture(scope="module")
def uneven_models(tmp_path_factory):
    llama = build_tiny_llama(tmp_path_factory.mktemp("llama6h2kv"), num_attention_heads=6, num_key_value_heads=2,
                             seed=3, **UNEVEN)
    llama10 = build_tiny_llama(tmp_path_factory.mktemp("llama10h2kv"), num_attention_heads=10,
                               num_key_value_heads=2, seed=7, **{**UNEVEN, "hidden_size": 80})
    gpt2 = build_tiny_gpt2(tmp_path_factory.mktemp("gpt2_6h"), n_head=6, n_embd=96, n_inner=90, vocab_size=701,
                           seed=5)
    return {"llama-6h-2kv": str(llama), "llama-10h-2kv": str(llama10), "gpt2-6h": str(gpt2)}


@pytest.fixture(scope="module")
def references(uneven_models):
    return hf_references(uneven_models, PROMPTS, NEW_TOKENS)


def test_the_models_really_are_cut_unevenly(uneven_models):
    llama = ShardPlan.build(load_hf_config(uneven_models["llama-6h-2kv"]), tp=4, pp=1)
    assert [len(llama.heads(r)) for r in range(4)] == [2, 2, 1, 1]
    assert [llama.kv_heads(r) for r in range(4)] == [range(0, 1), range(0, 2), range(1, 2), range(1, 2)]
    assert llama.kv_map(1) == (0, 1)
    llama10 = ShardPlan.build(load_hf_config(uneven_models["llama-10h-2kv"]), tp=4, pp=1)
    assert [len(llama10.heads(r)) for r in range(4)] == [3, 3, 2, 2]
    assert llama10.kv_heads(1) == range(0, 2) and llama10.kv_map(1) == (0, 0, 1)
    assert [len(llama.columns(r)) for r in range(4)] == [23, 23, 22, 22]
    assert llama.vocab_shard_sizes == (192, 192, 192, 128)
    gpt2 = ShardPlan.build(load_hf_config(uneven_models["gpt2-6h"]), tp=4, pp=1)
    assert [len(gpt2.kv_heads(r)) for r in range(4)] == [2, 2, 1, 1]


@pytest.mark.parametrize("tp,pp", [(4, 1)], ids=["tp4"])
def test_uneven_layout_matches_transformers(tp, pp, uneven_models, references):
    names = list(uneven_models)
    results = run_layout([Job(uneven_models[n], PROMPTS, NEW_TOKENS) for n in names], tp, pp)
    driver = results[driver_rank(tp, pp)]
    for j, name in enumerate(names):
        logit_diff, lp_diff = assert_matches_hf(driver[j], references[name], f"{name} tp={tp} pp={pp}")
        loaded = [results[r][j].loaded_bytes for r in range(tp)]
        assert len(set(loaded)) > 1, f"{name}: expected unequal shares at tp={tp}, got {loaded}"
        print(f"{name} tp={tp} pp={pp}: prefill logit diff {logit_diff:.2e}, logprob diff {lp_diff:.2e}, "
              f"bytes per stage-0 rank {loaded}")
