"""The bundled SmolLM2-135M, cut TP in {1, 3} x PP in {1, 2}, decodes exactly as `transformers`.

The uncut model (TP = PP = 1: one rank, the same `ModelRunner`) is checked against HF, tokens and
logprobs, on 32 prompts by tests/engine/test_llm_vs_hf.py; here every layout that cuts it.
"""

from __future__ import annotations

import pytest

from tests.distributed.harness import Job, driver_rank, run_layout
from tests.fixtures.reference import hf_greedy

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(1200)]

TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 32
LAYOUTS = [(3, 1), (1, 2), (3, 2)]


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    prompts = [tok(t)["input_ids"] for t in TEXTS]
    return str(smollm2_dir), prompts, [hf_greedy(str(smollm2_dir), p, NEW_TOKENS) for p in prompts]


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
def test_smollm2_layout_greedy_equals_transformers(tp, pp, smol):
    model, prompts, refs = smol
    driver = run_layout([Job(model, prompts, NEW_TOKENS)], tp, pp)[driver_rank(tp, pp)][0]
    worst = 0.0
    for i, (ref_tokens, ref_logprobs) in enumerate(refs):
        assert driver.tokens[i] == ref_tokens, f"tp={tp} pp={pp} prompt {TEXTS[i]!r}"
        worst = max(worst, max(abs(a - b) for a, b in zip(driver.logprobs[i], ref_logprobs)))
        assert worst <= 1e-4
    print(f"smollm2 tp={tp} pp={pp}: {NEW_TOKENS} tokens x {len(prompts)} prompts equal; max logprob diff {worst:.2e}")
