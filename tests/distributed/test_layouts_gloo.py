"""Every TP x PP layout over plain gloo processes computes what `transformers` computes.

One process per rank (torch.multiprocessing, no Ray, no engine), forced onto CPU + gloo even on a
machine with GPUs (the GPU path has its own test, test_gpu_nccl.py). For each layout the ranks load
their slices of every tiny model, prefill a batch of mixed-length prompts (logits compared with
HF's), then decode 16 greedy tokens through the paged KV cache (tokens compared with HF
`generate`, logprobs within 1e-4).
"""

from __future__ import annotations

import multiprocessing

import pytest

from tests.distributed.harness import Job, assert_matches_hf, driver_rank, hf_references, run_layout

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]

TINY = ["tiny_llama_dir", "tiny_llama_gqa_dir", "tiny_llama_rope_scaled_dir", "tiny_qwen2_dir",
        "tiny_mistral_dir", "tiny_gpt2_dir"]
# lengths 1..40 cross block boundaries (block_size 16) and mix in one batch
PROMPTS = [[5], [17, 3, 99, 250, 8], list(range(20, 38)), [(7 * i) % 300 + 3 for i in range(40)]]
NEW_TOKENS = 16
LAYOUTS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]


@pytest.fixture(scope="module")
def tiny_models(request):
    return {name: str(request.getfixturevalue(name)) for name in TINY}


@pytest.fixture(scope="module")
def references(tiny_models):
    return hf_references(tiny_models, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}-pp{p}" for t, p in LAYOUTS])
def test_layout_matches_transformers(tp, pp, tiny_models, references):
    names = list(tiny_models)
    results = run_layout([Job(tiny_models[n], PROMPTS, NEW_TOKENS) for n in names], tp, pp, backend="gloo")
    driver = results[driver_rank(tp, pp)]
    assert {res.backend for rank in results.values() for res in rank} == {"gloo"}
    for j, name in enumerate(names):
        logit_diff, lp_diff = assert_matches_hf(driver[j], references[name], f"{name} tp={tp} pp={pp}")
        print(f"{name} tp={tp} pp={pp}: max prefill logit diff {logit_diff:.2e}, max logprob diff {lp_diff:.2e}")
        # every rank of a TP group loads a 1/tp share of the stage (vocab padding aside)
        if tp > 1:
            loaded = [results[r][j].loaded_bytes for r in range(tp)]
            assert max(loaded) - min(loaded) <= 0.05 * max(loaded), f"{name}: uneven shares {loaded}"


def test_harness_terminates_its_ranks_on_timeout(tiny_llama_gqa_dir):
    """A deadline (or pytest-timeout) interrupting the wait must not leave rank processes behind."""
    with pytest.raises(TimeoutError, match="ranks still running"):
        run_layout([Job(str(tiny_llama_gqa_dir), [[5, 6]], 200)], 2, 1, timeout_s=0.5)
    assert multiprocessing.active_children() == []
