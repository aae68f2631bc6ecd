"""Shared by the Ray tests: prompts, generation through `LLM`, and the comparison with HF."""

from __future__ import annotations

import functools
import random

from cluster.llm import LLM
from scheduler.sampling_params import SamplingParams

LOGPROB_TOL = 1e-4


def mixed_prompts(vocab: int, lengths=(3, 17, 7, 12), seed: int = 0) -> list[list[int]]:
    """Token-id prompts of different lengths (ids >= 2 avoid the tiny models' EOS and pad)."""
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(n)] for n in lengths]


@functools.cache
def hf_expected(model_dir: str, prompt: tuple[int, ...], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """HF `generate` greedy tokens and logprobs, computed once per (model, prompt, length)."""
    from tests.fixtures.reference import hf_greedy

    tokens, logprobs = hf_greedy(model_dir, list(prompt), max_new_tokens)
    return list(tokens), [float(x) for x in logprobs]


def generate_greedy(llm: LLM, prompts: list[list[int]], max_tokens: list[int]):
    """All prompts submitted together (continuous batching: they finish at different steps)."""
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0) for n in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [lp[t] for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids,
                                                               strict=True)]) for o in outs]


def assert_matches_hf(model_dir, prompts: list[list[int]], max_tokens: list[int], got) -> None:
    for i, (prompt, n, (tokens, logprobs)) in enumerate(zip(prompts, max_tokens, got, strict=True)):
        want_tokens, want_logprobs = hf_expected(str(model_dir), tuple(prompt), n)
        assert tokens == want_tokens, f"prompt {i} (len {len(prompt)}): tokens {tokens} != HF {want_tokens}"
        worst = max(abs(a - b) for a, b in zip(logprobs, want_logprobs, strict=True))
        assert worst < LOGPROB_TOL, f"prompt {i}: logprobs differ from HF by {worst:.2e}"


def run_and_compare(model_dir, tp: int, pp: int, dp: int, address: str, prompts, max_tokens, **kwargs) -> LLM:
    """Generate through `LLM` on Ray (always Ray: `address` is given), compare with HF; where the ranks ran."""
    with LLM(str(model_dir), tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
             address=address, **kwargs) as llm:
        got = generate_greedy(llm, prompts, max_tokens)
        info = {"node_ids": dict(llm.executor.node_ids), "num_kv_blocks": llm.executor.num_kv_blocks,
                "num_preemptions": llm.engine.num_preemptions}
    assert_matches_hf(model_dir, prompts, max_tokens, got)
    return info
