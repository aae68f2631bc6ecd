"""Attention over a paged KV cache, batched over sequences with no per-sequence Python loop.

Each layer's cache is one tensor [2, num_blocks, block_size, kv_heads_local, head_dim]. A
sequence's token at position p lives in slot `block_table[p // block_size] * block_size +
p % block_size`. One step may mix prefill chunks and decode tokens. Sequences are split into at
most two groups, decodes (one query each) and prefills (many), so a 512-token prefill chunk
does not pad 63 decodes to 512 query rows. Within a group, queries are scattered into a padded
[B, max_q] grid, keys and values gathered through the block tables into [B, max_ctx], and a
boolean mask keeps each query to its own sequence's earlier positions.

The gather is one `index_select` of whole blocks into a buffer the runner keeps across layers
and steps (`GatherWorkspace`): measured on CPU, advanced indexing `cache[block_tables]` was ~3x
slower, and a fresh multi-MB tensor per layer pays its page faults every time (at 256
sequences x 300 tokens, 215 ms against 24 ms into a reused buffer; benchmarks/NOTES.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionGroup:
    """Sequences attended together: their tokens, block tables and mask."""

    token_idx: torch.Tensor     # [T_g] rows of the step's flat token batch belonging to this group
    block_tables: torch.Tensor  # [B_g, max_blocks] padded with block 0 (masked out)
    q_seq: torch.Tensor         # [T_g] which sequence (row of the group) each token belongs to
    q_off: torch.Tensor         # [T_g] index of the token within its sequence's chunk
    mask: torch.Tensor          # [B_g, 1, max_q, max_blocks * block_size] True = may attend
    max_q: int


class GatherWorkspace:
    """Grow-only buffers that every layer's gathered keys and values are written into.

    Layers run one after another, and a group's gathered K/V are consumed before the next
    gather, so one pair of buffers serves every group of every layer of every step.
    """

    def __init__(self):
        self.keys = self.values = torch.empty(0)

    def get(self, numel: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two flat buffers of `numel` elements with `like`'s dtype and device."""
        if self.keys.numel() < numel or self.keys.dtype != like.dtype or self.keys.device != like.device:
            self.keys = torch.empty(numel, dtype=like.dtype, device=like.device)
            self.values = torch.empty(numel, dtype=like.dtype, device=like.device)
        return self.keys[:numel], self.values[:numel]


@dataclass
class AttentionMetadata:
    """Built once per step by the runner, shared by every layer."""

    positions: torch.Tensor     # [T] position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    groups: list[AttentionGroup]
    rope: tuple[torch.Tensor, torch.Tensor] | None = None   # (cos, sin) [T, 1, D], set by the model once
    workspace: GatherWorkspace | None = None                 # None: a fresh one for this step


class PagedAttention(nn.Module):
    """`kv_map[i]`: which of this rank's KV heads its i-th query head attends with.

    When every KV head serves the same number of consecutive query heads, SDPA's `enable_gqa`
    does the mapping. An uneven TP split can break that (a rank holding query heads 5 and 6 of
    a 3-per-group model has KV heads 1 and 2, one query head each, but query heads 3 and 4 on
    another rank both use KV head 1): then keys and values are expanded to one per query head.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 kv_map: tuple[int, ...] | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        group = max(1, num_heads // num_kv_heads)
        uniform = tuple(min(i // group, num_kv_heads - 1) for i in range(num_heads))
        self.kv_map = uniform if kv_map is None else tuple(kv_map)
        if len(self.kv_map) != num_heads or not set(self.kv_map) <= set(range(num_kv_heads)):
            raise ValueError(f"kv_map={kv_map} must give one of {num_kv_heads} KV heads for each of {num_heads} heads")
        # None: SDPA's grouped mapping is right; else the index that expands K/V per query head
        # (a tuple: the module is built on the meta device, where a tensor would hold no data)
        even = num_heads % num_kv_heads == 0 and self.kv_map == uniform
        self.expand = None if even else self.kv_map

    # eager even inside a compiled decode step (sharding/compiled.py): the context length changes
    # every step, and a graph per length would recompile every block
    @torch.compiler.disable
    def forward(self, q, k, v, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KV, D]; kv_cache: [2, blocks, block_size, KV, D]
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        flat = (-1, self.num_kv_heads, self.head_dim)
        # write every new token first: a prefill chunk attends to its own keys
        k_cache.view(flat).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(flat).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        if meta.workspace is None:
            meta.workspace = GatherWorkspace()
        if len(meta.groups) == 1:
            return self._attend(q, k_cache, v_cache, meta.groups[0], meta.workspace).reshape(q.shape[0], -1)
        out = q.new_empty(q.shape)
        for group in meta.groups:   # at most two: decodes, prefills
            out[group.token_idx] = self._attend(q[group.token_idx], k_cache, v_cache, group, meta.workspace)
        return out.reshape(q.shape[0], -1)

    def _gather(self, k_cache, v_cache, g: AttentionGroup, ws: GatherWorkspace):
        """keys, values: [B, KV, max_ctx, D] (views of the workspace), whole blocks at a time."""
        batch, blocks = g.block_tables.shape
        per_block = k_cache[0].numel()   # block_size * KV * D
        kbuf, vbuf = ws.get(batch * blocks * per_block, k_cache)
        index = g.block_tables.reshape(-1)
        torch.index_select(k_cache.view(-1, per_block), 0, index, out=kbuf.view(-1, per_block))
        torch.index_select(v_cache.view(-1, per_block), 0, index, out=vbuf.view(-1, per_block))
        shape = (batch, blocks * k_cache.shape[1], self.num_kv_heads, self.head_dim)
        return kbuf.view(shape).transpose(1, 2), vbuf.view(shape).transpose(1, 2)

    def _attend(self, q, k_cache, v_cache, g: AttentionGroup, ws: GatherWorkspace) -> torch.Tensor:
        batch = g.block_tables.shape[0]
        keys, values = self._gather(k_cache, v_cache, g, ws)
        if g.max_q == 1:   # decode: one query per sequence, already in row order
            qp = q.view(batch, 1, self.num_heads, self.head_dim)
        else:              # queries: [B, max_q, H, D]; padding rows are zero and attend to slot 0 only
            qp = q.new_zeros(batch, g.max_q, self.num_heads, self.head_dim)
            qp[g.q_seq, g.q_off] = q
        if self.expand is not None:   # non-uniform groups: one K/V per query head
            index = torch.tensor(self.expand, device=keys.device)
            keys, values = keys.index_select(1, index), values.index_select(1, index)
        out = F.scaled_dot_product_attention(qp.transpose(1, 2), keys.to(q.dtype), values.to(q.dtype),
                                             attn_mask=g.mask, scale=self.scale,
                                             enable_gqa=keys.shape[1] != self.num_heads)
        # back to [T_g, H, D]
        out = out.transpose(1, 2)
        return out.reshape(batch, self.num_heads, self.head_dim) if g.max_q == 1 else out[g.q_seq, g.q_off]
