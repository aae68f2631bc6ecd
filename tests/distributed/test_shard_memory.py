"""Each TP rank reads only its share of the weights, and its private memory never nears the model.

SmolLM2 (9 heads) cannot be cut in two, so TP=2 is measured on a ~270 MB random Llama built
here, and SmolLM2 at TP=3. The bytes a rank loaded are counted by the loader; memory growth is
the rank's private (anonymous) RSS sampled while it loads, because `ru_maxrss` also counts the
safetensors file pages the OS maps in (shared page cache, not the rank's own memory).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from tests.distributed.harness import Job, run_layout

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def medium_llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, num_hidden_layers=6,
                      intermediate_size=2048, vocab_size=16000, tie_word_embeddings=False)
    path = tmp_path_factory.mktemp("medium_llama")
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("model_fixture,tp", [("medium_llama_dir", 2), ("smollm2_dir", 3)])
def test_tp_ranks_each_load_their_share_and_stay_far_below_the_model(model_fixture, tp, request, record_property):
    model_dir = request.getfixturevalue(model_fixture)
    sizes = {}
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            sizes.update({k: h.get_slice(k).get_shape() for k in h.keys()})
    total = sum(4 * torch.Size(s).numel() for s in sizes.values())
    replicated = sum(4 * torch.Size(s).numel() for k, s in sizes.items() if k.endswith("norm.weight"))
    share = (total - replicated) / tp + replicated
    results = run_layout([Job(str(model_dir), [[1, 2, 3]], 1)], tp=tp, pp=1)
    for rank, (res,) in results.items():
        growth = (res.peak_anon_kb - res.rss_before_kb) * 1024
        record_property(f"rank{rank}_loaded_bytes", res.loaded_bytes)
        record_property(f"rank{rank}_private_growth_bytes", growth)
        print(f"{model_fixture} tp={tp} rank {rank}: loaded {res.loaded_bytes / 2**20:.1f} MiB of "
              f"{total / 2**20:.1f} MiB (share {share / 2**20:.1f}); private memory peak growth "
              f"{growth / 2**20:.1f} MiB; ru_maxrss {res.peak_rss_kb / 1024:.0f} MiB")
        assert abs(res.loaded_bytes - share) <= 0.01 * total, (rank, res.loaded_bytes, share)
        # its own share plus transient slices and the KV cache, never the whole model
        assert growth < share + 0.1 * total, f"rank {rank} grew {growth} bytes for a {total}-byte model"
