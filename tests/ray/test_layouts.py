"""Every (T, P, D) layout through Ray gives HF `generate`'s greedy tokens, logprobs within 1e-4.

All prompts arrive together with different lengths and different max_tokens, so the batch
changes as sequences finish (continuous batching) and, with P > 1, is split into micro-batches.
One local Ray serves the whole module; `address=` makes even the 1 x 1 x 1 layout use Ray.

The tiny Llama runs every layout. Each engine start costs its workers' process starts, so the other
models run only where they add something: GPT-2 (learned positions, tied lm_head, fused QKV) at the
two layouts that between them use TP, PP and DP through Ray; SmolLM2 at T=3 (its even head split;
the uneven ones, with P=2, are tests/ray/test_uneven_smollm2.py). Every TP x PP cut of every tiny
model and of SmolLM2 is also checked against HF over plain gloo (tests/distributed/).
"""

from __future__ import annotations

import pytest

from tests.ray.common import mixed_prompts, run_and_compare

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2), (1, 2, 2)]   # (T, P, D)
GPT2_LAYOUTS = [(2, 2, 1), (1, 2, 2)]
CASES = [("tiny_llama_dir", *layout) for layout in LAYOUTS] + [("tiny_gpt2_dir", *layout) for layout in GPT2_LAYOUTS]
MAX_TOKENS = [6, 9, 4, 8]


@pytest.mark.parametrize("model_fixture,tp,pp,dp", CASES, ids=[f"{m}-T{t}P{p}D{d}" for m, t, p, d in CASES])
def test_tiny_model_layout_matches_hf(request, ray_local, model_fixture, tp, pp, dp):
    model_dir = request.getfixturevalue(model_fixture)
    prompts = mixed_prompts(vocab=509)
    info = run_and_compare(model_dir, tp, pp, dp, ray_local, prompts, MAX_TOKENS)
    assert len(info["node_ids"]) == tp * pp * dp


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp", [(3, 1, 1)], ids=["T3P1D1"])
def test_smollm2_layout_matches_hf(smollm2_dir, ray_local, tp, pp, dp):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    texts = ["The capital of France is", "Once upon a time, in a small village"]
    prompts = [tok.encode(t).ids for t in texts]
    run_and_compare(smollm2_dir, tp, pp, dp, ray_local, prompts, [16, 24])
