"""Quantized pipeline stages through Ray: a `shardline quantize` folder at PP=2 generates what
`transformers` generates on the dequantized weights (tokens equal, logprobs within 1e-4), and
every worker reports the kernels it chose by measurement."""

from __future__ import annotations

import pytest

from cluster.llm import LLM
from sharding.quant.folder import quantize_folder
from tests.fixtures.quant_reference import fake_quantized_folder
from tests.ray.common import assert_matches_hf, generate_greedy, mixed_prompts

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_pp2_prequantized_int8_folder_matches_hf_on_dequantized_weights(ray_local, tiny_llama_gqa_dir, tmp_path):
    folder = quantize_folder(tiny_llama_gqa_dir, tmp_path / "int8", "int8")
    reference = fake_quantized_folder(tiny_llama_gqa_dir, tmp_path / "ref", "int8")
    prompts, max_tokens = mixed_prompts(vocab=509), [6, 9, 4, 8]
    with LLM(str(folder), pipeline_parallel_size=2, address=ray_local, num_kv_blocks=32) as llm:
        got = generate_greedy(llm, prompts, max_tokens)
        reports = [info["quant"] for info in llm.executor.worker_info]
    assert_matches_hf(reference, prompts, max_tokens, got)
    assert len(reports) == 2 and all(r["method"] == "int8" and r["layers"] == 2 * 4 for r in reports)
    assert all(k["kernel"] for r in reports for k in r["kernels"].values())
