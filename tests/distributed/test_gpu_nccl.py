"""The GPU path: the same layouts over CUDA + NCCL (selected by `sharding.dist.select_device`).

Hardware-only: reported as skipped, with the reason, on machines without two CUDA devices
(every machine this project has run on so far).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import Job, driver_rank, run_layout
from tests.fixtures.reference import hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.distributed, pytest.mark.timeout(600),
              pytest.mark.skipif(torch.cuda.device_count() < 2,
                                 reason=f"needs 2 CUDA GPUs for NCCL; this machine has {torch.cuda.device_count()}")]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_nccl_layout_matches_transformers(tp, pp, tiny_llama_gqa_dir):
    prompts = [[5, 6, 7], list(range(20, 38))]
    driver = run_layout([Job(str(tiny_llama_gqa_dir), prompts, 8)], tp, pp)[driver_rank(tp, pp)][0]
    for i, p in enumerate(prompts):
        assert driver.tokens[i] == hf_greedy(str(tiny_llama_gqa_dir), p, 8)[0]
