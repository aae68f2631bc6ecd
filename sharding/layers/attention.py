"""Attention over a paged KV cache, batched over sequences with no per-sequence Python loop.

Each layer's cache is one tensor [2, num_blocks, block_size, kv_heads_local, head_dim]. A
sequence's token at position p lives in slot `block_table[p // block_size] * block_size +
p % block_size`. One step may mix prefill chunks and decode tokens: queries are scattered into
a padded [B, max_q] grid, keys and values gathered through the block tables into [B, max_ctx],
and a boolean mask keeps each query to its own sequence's earlier positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Built once per step by the runner, shared by every layer."""

    positions: torch.Tensor     # [T] position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # [B, max_blocks] padded with block 0 (masked out)
    q_seq: torch.Tensor         # [T] which sequence (row of the batch) each token belongs to
    q_off: torch.Tensor         # [T] index of the token within its sequence's chunk
    mask: torch.Tensor          # [B, 1, max_q, max_blocks * block_size] True = may attend
    max_q: int


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    def forward(self, q, k, v, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KV, D]; kv_cache: [2, blocks, block_size, KV, D]
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        flat = (-1, self.num_kv_heads, self.head_dim)
        k_cache.view(flat).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(flat).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))

        batch = meta.block_tables.shape[0]
        # keys, values: [B, KV, max_ctx, D]
        keys = k_cache[meta.block_tables].flatten(1, 2).transpose(1, 2)
        values = v_cache[meta.block_tables].flatten(1, 2).transpose(1, 2)
        # queries: [B, H, max_q, D]; padding rows are zero and attend to slot 0 only
        qp = q.new_zeros(batch, meta.max_q, self.num_heads, self.head_dim)
        qp[meta.q_seq, meta.q_off] = q
        out = F.scaled_dot_product_attention(qp.transpose(1, 2), keys, values, attn_mask=meta.mask,
                                             scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        # back to [T, H * D]
        return out.transpose(1, 2)[meta.q_seq, meta.q_off].reshape(q.shape[0], -1)
