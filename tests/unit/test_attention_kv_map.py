"""`PagedAttention` maps each local query head to its own KV head, also for unequal groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sharding.layers.attention import AttentionGroup, AttentionMetadata, PagedAttention


def test_unequal_kv_groups_attend_with_the_right_kv_head():
    # 3 query heads on 2 KV heads, mapped (0, 0, 1): a rank of an uneven split (10 heads / 2 KV at T=4)
    torch.manual_seed(0)
    tokens, dim, block = 5, 8, 8
    q = torch.randn(tokens, 3, dim)
    k, v = torch.randn(tokens, 2, dim), torch.randn(tokens, 2, dim)
    attn = PagedAttention(3, 2, dim, dim ** -0.5, kv_map=(0, 0, 1))
    assert attn.expand is not None
    cache = torch.zeros(2, 2, block, 2, dim)
    causal = torch.ones(tokens, block, dtype=torch.bool).tril()
    group = AttentionGroup(token_idx=torch.arange(tokens), block_tables=torch.tensor([[1]]),
                           q_seq=torch.zeros(tokens, dtype=torch.long), q_off=torch.arange(tokens),
                           mask=causal[None, None], max_q=tokens)
    meta = AttentionMetadata(positions=torch.arange(tokens), slot_mapping=torch.arange(block, block + tokens),
                             groups=[group])
    out = attn(q, k, v, cache, meta).view(tokens, 3, dim)
    for head, kv_head in enumerate((0, 0, 1)):   # each head alone, with its own KV head
        want = F.scaled_dot_product_attention(q[:, head][None], k[:, kv_head][None], v[:, kv_head][None],
                                              is_causal=True, scale=dim ** -0.5)[0]
        assert torch.allclose(out[:, head], want, atol=1e-6), f"head {head}"
