"""Tensor-parallel linear layers (one idea per class; collectives named at the call site).

Weights are stored [out_local, in_local] like `nn.Linear`. A checkpoint slice arrives as a
safetensors `get_slice` handle, so a rank reads only its own rows or columns from disk. GPT-2
stores its `Conv1D` weights transposed ([in, out]); layers built with `transposed=True` read
the other axis and transpose after reading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sharding.dist import ParallelGroups, tp_all_reduce


class WeightShapeError(ValueError):
    """A checkpoint tensor does not have the shape the model config implies."""


class DenseMatmul:
    """The one place a linear layer gets its matmul. Quantized methods replace this object."""

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight)


def read_rows(sl, rows: range, transposed: bool, expected_cols: int, name: str) -> torch.Tensor:
    """Rows [rows] of a logical [out, in] weight (or of a 1-D bias) from a safetensors slice."""
    shape = sl.get_shape()
    if len(shape) == 1:
        return sl[rows.start:rows.stop]
    cols = shape[0] if transposed else shape[1]
    if cols != expected_cols:
        raise WeightShapeError(f"{name}: has shape {shape}, expected input dimension {expected_cols}")
    if transposed:
        return sl[:, rows.start:rows.stop].t()
    return sl[rows.start:rows.stop]


def read_cols(sl, cols: range, transposed: bool, name: str) -> torch.Tensor:
    """Columns [cols] of a logical [out, in] weight from a safetensors slice."""
    if transposed:
        return sl[cols.start:cols.stop].t()
    return sl[:, cols.start:cols.stop]


def copy_checked(param: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    if tuple(loaded.shape) != tuple(param.shape):
        raise WeightShapeError(f"{name}: this rank's slice has shape {tuple(loaded.shape)}, "
                               f"expected {tuple(param.shape)} (does config.json match the weights?)")
    param.data.copy_(loaded)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, groups: ParallelGroups,
                 transposed: bool = False):
        super().__init__()
        self.groups = groups
        self.transposed = transposed
        self.in_features = in_features      # local
        self.out_features = out_features    # local
        self.matmul = DenseMatmul()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, sl, name: str, shard_id=None) -> int:
        raise NotImplementedError


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight (small projections, tp=1)."""

    def weight_loader(self, param, sl, name, shard_id=None) -> int:
        rows = range(param.shape[0])
        loaded = read_rows(sl, rows, self.transposed, self.in_features, name)
        copy_checked(param, loaded, name)
        return loaded.numel() * loaded.element_size()

    def forward(self, x):
        y = self.matmul.apply(self, x)
        return y if self.bias is None else y + self.bias


class ColumnParallelLinear(LinearBase):
    """Y = X A with A split by columns (output features); each rank keeps its own Y slice.

    `output_sizes` lists the logical sub-matrices fused in one checkpoint tensor or merged here
    (e.g. [gate, up]); each is split across ranks separately so every rank gets a piece of each.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool, groups: ParallelGroups,
                 transposed: bool = False):
        tp = groups.tp_size
        for size in output_sizes:
            if size % tp:
                raise WeightShapeError(f"output size {size} is not divisible by tensor_parallel_size={tp}")
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes) // tp, bias, groups, transposed)

    def _local_offset(self, shard: int) -> int:
        return sum(self.output_sizes[:shard]) // self.groups.tp_size

    def _rank_rows(self, shard: int) -> range:
        per = self.output_sizes[shard] // self.groups.tp_size
        start = self.groups.tp_rank * per
        return range(start, start + per)

    def weight_loader(self, param, sl, name, shard_id=None) -> int:
        """shard_id: index into output_sizes, or None for a tensor holding all of them fused."""
        shards = range(len(self.output_sizes)) if shard_id is None else [shard_id]
        total = 0
        ckpt_offset = 0
        for shard in shards:
            rows = self._rank_rows(shard)
            if shard_id is None:   # fused in the checkpoint: shift into this sub-matrix
                ckpt_offset = sum(self.output_sizes[:shard])
            rows = range(rows.start + ckpt_offset, rows.stop + ckpt_offset)
            loaded = read_rows(sl, rows, self.transposed, self.in_features, name)
            local = self._local_offset(shard)
            copy_checked(param.data.narrow(0, local, len(rows)), loaded, name)
            total += loaded.numel() * loaded.element_size()
        return total

    def forward(self, x):
        # x: [tokens, in] -> [tokens, out/tp]; no communication
        y = self.matmul.apply(self, x)
        return y if self.bias is None else y + self.bias


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections merged; each rank owns whole heads (and whole KV heads, for GQA)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 groups: ParallelGroups, transposed: bool = False):
        super().__init__(hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         bias, groups, transposed)

    SHARDS = {"q": 0, "k": 1, "v": 2}

    def weight_loader(self, param, sl, name, shard_id=None) -> int:
        return super().weight_loader(param, sl, name, None if shard_id is None else self.SHARDS[shard_id])


class RowParallelLinear(LinearBase):
    """Y = X A with A split by rows (input features); partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, groups: ParallelGroups,
                 transposed: bool = False):
        if in_features % groups.tp_size:
            raise WeightShapeError(f"input size {in_features} is not divisible by "
                                   f"tensor_parallel_size={groups.tp_size}")
        self.full_in = in_features
        super().__init__(in_features // groups.tp_size, out_features, bias, groups, transposed)

    def weight_loader(self, param, sl, name, shard_id=None) -> int:
        if param.dim() == 1:   # bias: whole, added once after the all-reduce
            loaded = sl[:]
        else:
            shape = sl.get_shape()
            out_dim = shape[1] if self.transposed else shape[0]
            if out_dim != self.out_features:
                raise WeightShapeError(f"{name}: has shape {shape}, expected output dimension {self.out_features}")
            per = self.in_features
            cols = range(self.groups.tp_rank * per, (self.groups.tp_rank + 1) * per)
            loaded = read_cols(sl, cols, self.transposed, name)
        copy_checked(param, loaded, name)
        return loaded.numel() * loaded.element_size()

    def forward(self, x):
        # x: [tokens, in/tp] -> partial [tokens, out]; sum the partials across the TP group
        y = self.matmul.apply(self, x)
        y = tp_all_reduce(y, self.groups)
        return y if self.bias is None else y + self.bias
