"""With TP=2 each rank reads about half the weights and its private memory never nears the model."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from tests.distributed.harness import Job, run_layout

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


def test_tp2_ranks_each_load_half_the_linear_weights(smollm2_dir, record_property):
    path = smollm2_dir / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    total = sum(4 * _numel(s) for s in sizes.values())
    linear = sum(4 * _numel(s) for k, s in sizes.items() if k.endswith("proj.weight"))
    results = run_layout([Job(str(smollm2_dir), [[1, 2, 3]], 1)], tp=2, pp=1)
    for rank, (res,) in results.items():
        # rank's share: half of every linear and of the (tied) embedding, plus replicated norms
        assert 0.49 * total <= res.loaded_bytes <= 0.51 * total + 0.01 * linear, (rank, res.loaded_bytes, total)
        growth = (res.peak_anon_kb - res.rss_before_kb) * 1024
        record_property(f"rank{rank}_loaded_bytes", res.loaded_bytes)
        record_property(f"rank{rank}_private_growth_bytes", growth)
        record_property(f"rank{rank}_ru_maxrss_kb", res.peak_rss_kb)
        print(f"rank {rank}: loaded {res.loaded_bytes / 2**20:.1f} MiB of {total / 2**20:.1f} MiB; "
              f"private memory grew {growth / 2**20:.1f} MiB during load; ru_maxrss {res.peak_rss_kb / 1024:.0f} MiB")
        # its own half plus the KV cache and transient slices, never the whole model
        assert growth < 0.75 * total, f"rank {rank} private memory grew by {growth} bytes of a {total}-byte model"


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
