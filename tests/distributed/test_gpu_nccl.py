"""The GPU path: the same layouts over CUDA + NCCL (selected by `sharding.dist.select_device`).

Hardware-only: reported as skipped, with the reason, where it cannot run. The Makefile pins the
CPU-only torch wheel (`torch==2.13.0` from the CPU index), which has no CUDA at all, so under
`make test` this test is ALWAYS skipped. To run it on a machine with 2+ NVIDIA GPUs, install a
CUDA build of torch into the venv (cuXXX: the CUDA version of your driver, see pytorch.org) and
run it directly (see README, "What has only been run on CPU"):

    .venv/bin/pip install --force-reinstall torch==2.13.0 --index-url https://download.pytorch.org/whl/cuXXX
    .venv/bin/python -m pytest tests/distributed/test_gpu_nccl.py -v
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.harness import Job, driver_rank, run_layout
from tests.fixtures.reference import hf_greedy


def _skip_reason() -> str | None:
    """Why the NCCL test cannot run here: no CUDA in this torch build, or too few GPUs."""
    if not torch.backends.cuda.is_built():
        return (f"this torch build has no CUDA (torch {torch.__version__}, the CPU-only wheel the Makefile pins); "
                "install a CUDA build of torch on a machine with 2 GPUs to run the NCCL test")
    if torch.cuda.device_count() < 2:
        return (f"needs 2 CUDA GPUs for NCCL; torch {torch.__version__} has CUDA {torch.version.cuda} but this "
                f"machine has {torch.cuda.device_count()} GPU(s)")
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.distributed, pytest.mark.timeout(600),
              pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_nccl_layout_matches_transformers(tp, pp, tiny_llama_gqa_dir):
    prompts = [[5, 6, 7], list(range(20, 38))]
    results = run_layout([Job(str(tiny_llama_gqa_dir), prompts, 8)], tp, pp, backend="nccl")
    assert {res[0].backend for res in results.values()} == {"nccl"}
    driver = results[driver_rank(tp, pp)][0]
    for i, p in enumerate(prompts):
        assert driver.tokens[i] == hf_greedy(str(tiny_llama_gqa_dir), p, 8)[0]
