"""Vocabulary-parallel embedding and LM head: each TP rank owns a contiguous block of rows.

The blocks come from the `ShardPlan` and may differ in size between ranks (by one alignment
block); the LM head's gather pads to the largest and trims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sharding.dist import ParallelGroups, tp_all_gather_last_dim, tp_all_reduce
from sharding.layers.linear import DenseMatmul, WeightShapeError, copy_checked


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the (padded) vocabulary; other ids contribute zeros, then all-reduce.

    `shard_sizes` holds every TP rank's row count, in rank order; this rank's rows follow the
    earlier ranks' (the plan's `vocab_rows`).
    """

    def __init__(self, vocab_size: int, shard_sizes: tuple[int, ...], hidden: int, groups: ParallelGroups):
        super().__init__()
        if len(shard_sizes) != groups.tp_size:
            raise ValueError(f"{len(shard_sizes)} vocabulary shard sizes for tensor_parallel_size={groups.tp_size}")
        self.groups = groups
        self.vocab_size = vocab_size
        self.hidden = hidden
        self.shard_sizes = tuple(shard_sizes)
        self.start = sum(shard_sizes[:groups.tp_rank])
        self.end = self.start + shard_sizes[groups.tp_rank]
        self.weight = nn.Parameter(torch.empty(self.end - self.start, hidden), requires_grad=False)

    def weight_loader(self, param, sl, name, shard_id=None) -> int:
        shape = sl.get_shape()
        if list(shape) != [self.vocab_size, self.hidden]:
            raise WeightShapeError(f"{name}: has shape {shape}, expected [{self.vocab_size}, {self.hidden}]")
        real_end = min(self.end, self.vocab_size)
        param.data.zero_()   # padding rows stay zero
        if real_end <= self.start:
            return 0
        loaded = sl[self.start:real_end]
        copy_checked(param.data.narrow(0, 0, real_end - self.start), loaded, name)
        return loaded.numel() * loaded.element_size()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [tokens] -> [tokens, hidden]
        if self.groups.tp_size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.start) & (ids < self.end)
        out = F.embedding(torch.where(mine, ids - self.start, 0), self.weight)
        out = out * mine.unsqueeze(-1).to(out.dtype)
        return tp_all_reduce(out, self.groups)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for this rank's vocabulary rows, gathered so the sampler sees the whole vocabulary.

    With tied embeddings the same checkpoint tensor is read (and, on a stage that also embeds,
    the same parameter is shared). `matmul` is the linear layers' seam too (w8a8 replaces it).
    """

    matmul = DenseMatmul()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [n, hidden] -> local logits [n, rows of this rank] -> all-gather -> [n, vocab]
        local = self.matmul.apply(self, hidden)
        logits = tp_all_gather_last_dim(local, self.groups, self.shard_sizes)
        return logits[:, : self.vocab_size]
