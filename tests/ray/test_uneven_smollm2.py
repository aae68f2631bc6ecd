"""The bundled SmolLM2-135M (9 heads, 3 KV heads) at tensor-parallel sizes that do not divide
its heads, through Ray: greedy tokens identical to HF `generate`, logprobs within 1e-4.

- T=2: whole KV groups, ranks hold 6 and 3 query heads (2 and 1 KV heads);
- T=4: heads 3, 2, 2, 2; KV head 1 is replicated on ranks 1 and 2, and rank 2's two query
  heads use two different KV heads;
- T=2 x P=2: the uneven TP split inside each pipeline stage, with a 5-block KV pool of 4-token
  blocks and an 8-token step budget, so prompts are prefilled in chunks and a sequence is
  preempted and recomputed (prefix caching is on, as by default).

One engine per layout, two short prompts (SmolLM2 at T=4 on two cores is slow).
"""

from __future__ import annotations

import logging

import pytest

from tests.ray.common import run_and_compare

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

LAYOUTS = [(2, 1), (4, 1), (2, 2)]
SMALL_POOL = {"block_size": 4, "num_kv_blocks": 5, "max_num_batched_tokens": 8}   # chunked prefill + preemption
TEXTS = ["The capital of France is", "Once upon a time, in a small village"]
MAX_TOKENS = [8, 6]


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    return [tok.encode(t).ids for t in TEXTS]


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"T{t}P{p}" for t, p in LAYOUTS])
def test_smollm2_uneven_tp_matches_hf(smollm2_dir, ray_local, prompts, tp, pp, caplog):
    small = pp == 2
    with caplog.at_level(logging.INFO, logger="cluster.llm"):
        info = run_and_compare(smollm2_dir, tp, pp, 1, ray_local, prompts, MAX_TOKENS, **(SMALL_POOL if small else {}))
    if small:
        assert info["num_preemptions"] > 0, info
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "cluster.llm")
    assert f"tp={tp} x pp={pp}" in logged and "imbalance (max/mean): FLOPs" in logged, logged
    print(logged)
