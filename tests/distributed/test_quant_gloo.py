"""Quantized TP=2 over plain gloo processes: each rank quantizes only its slices, and together
they compute what `transformers` computes on the dequantized weights.

Per-output-channel scales follow the column splits and int4 groups stay inside each rank's
row-parallel columns, so quantizing slices equals quantizing the whole model: weight-only
methods match HF on a dequantized copy within 1e-4, at load or from a `shardline quantize`
folder. w8a8 adds activation noise, bounded loosely.
"""

from __future__ import annotations

import pytest

from sharding.quant.folder import quantize_folder
from tests.distributed.harness import Job, driver_rank, run_layout
from tests.fixtures.quant_reference import fake_quantized_folder
from tests.fixtures.reference import hf_prefill_logits

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]

PROMPTS = [[5], [17, 3, 99, 250, 8], list(range(20, 38))]


def test_tp2_quantized_slices_match_hf_on_dequantized_weights(tiny_llama_dir, tmp_path):
    ref = {m: fake_quantized_folder(tiny_llama_dir, tmp_path / f"ref-{m}", m) for m in ("int8", "int4-g32")}
    folder = quantize_folder(tiny_llama_dir, tmp_path / "q-int4", "int4-g32")
    jobs = [Job(str(tiny_llama_dir), PROMPTS, 4, quantization="int8"),
            Job(str(tiny_llama_dir), PROMPTS, 4, quantization="int4-g32"),
            Job(str(folder), PROMPTS, 4, quantization="int4-g32"),
            Job(str(tiny_llama_dir), PROMPTS, 4, quantization="w8a8")]
    results = run_layout(jobs, tp=2, pp=1)
    driver = results[driver_rank(2, 1)]
    for j, method in [(0, "int8"), (1, "int4-g32"), (2, "int4-g32")]:
        for i, p in enumerate(PROMPTS):
            want = hf_prefill_logits(ref[method], p)[-1]
            diff = (driver[j].prefill_logits[i] - want).abs().max().item()
            assert diff <= 1e-4, f"job {j} ({method}) prompt {i}: logits differ from HF by {diff:.2e}"
        shares = [results[r][j].quant["linear_weight_bytes"] for r in (0, 1)]
        assert shares[0] == shares[1] > 0, f"job {j}: each rank holds half the quantized weights, got {shares}"
    assert driver[1].tokens == driver[2].tokens   # at load == pre-quantized folder
    for i, p in enumerate(PROMPTS):
        want = hf_prefill_logits(ref["int8"], p)[-1]
        rel = ((driver[3].prefill_logits[i] - want).norm() / want.norm()).item()
        assert 1e-5 < rel < 0.3, f"w8a8 prompt {i}: relative logit error {rel:.2e}"
    assert all(results[r][3].quant["lm_head_bytes"] > 0 for r in (0, 1))   # w8a8 quantizes each head slice
