"""`compile=True` (sharding/compiled.py): compiled, padded decode steps still compute what `transformers` does.

Three prompts decode in a bucket of four, so every step carries one padding row through the
compiled graphs and the scratch KV block. One tiny Llama per layout keeps the compile cost to
one bucket's graphs (a few seconds per rank).
"""

from __future__ import annotations

import pytest

from tests.distributed.harness import Job, assert_matches_hf, driver_rank, hf_references, run_layout

# a cold inductor cache on a loaded machine took minutes to compile one bucket (benchmarks/NOTES.md section 4)
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

PROMPTS = [[5], [17, 3, 99, 250, 8], list(range(20, 38))]   # 3 sequences: bucket 4, one padding row
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return hf_references({"llama": str(tiny_llama_dir)}, PROMPTS, NEW_TOKENS)["llama"]


# TP=2 only: it covers the one-rank path too (the same graphs, with the all-reduces between them),
# and every compiled layout costs a cold compile on a fresh CI machine
@pytest.mark.parametrize("tp", [2], ids=["tp2"])
def test_compiled_decode_matches_transformers(tp, tiny_llama_dir, reference):
    results = run_layout([Job(str(tiny_llama_dir), PROMPTS, NEW_TOKENS, compile=True)], tp, 1, backend="gloo")
    driver = results[driver_rank(tp, 1)][0]
    logit_diff, lp_diff = assert_matches_hf(driver, reference, f"compile=True tp={tp}")
    print(f"compile tp={tp}: {driver.compiled_graphs} graphs; max logit diff {logit_diff:.2e}, "
          f"max logprob diff {lp_diff:.2e}")
    # the decode steps really went through torch.compile on every rank
    assert all(rank[0].compiled_graphs > 0 for rank in results.values())
