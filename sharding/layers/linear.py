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

# inside a compiled decode step (sharding/compiled.py) the all-reduce is a graph break and runs
# eagerly: gloo collectives are never traced
_eager_all_reduce = torch.compiler.disable(tp_all_reduce)


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
    (e.g. [gate, up]); `output_ranges` gives this rank's rows of each (from the `ShardPlan`, so
    ranks may own unequal shares). The local weight is the ranges' rows stacked in order.
    """

    def __init__(self, in_features: int, output_sizes: list[int], output_ranges: list[range], bias: bool,
                 groups: ParallelGroups, transposed: bool = False):
        if len(output_ranges) != len(output_sizes):
            raise ValueError(f"{len(output_ranges)} output ranges for {len(output_sizes)} output sizes")
        for size, rows in zip(output_sizes, output_ranges):
            if rows.start < 0 or rows.stop > size:
                raise WeightShapeError(f"rows {rows} are outside an output of size {size}")
        self.output_sizes = list(output_sizes)
        self.output_ranges = list(output_ranges)
        super().__init__(in_features, sum(len(r) for r in output_ranges), bias, groups, transposed)

    def _local_offset(self, shard: int) -> int:
        return sum(len(r) for r in self.output_ranges[:shard])

    def weight_loader(self, param, sl, name, shard_id=None) -> int:
        """shard_id: index into output_sizes, or None for a tensor holding all of them fused."""
        shards = range(len(self.output_sizes)) if shard_id is None else [shard_id]
        total = 0
        for shard in shards:
            rows = self.output_ranges[shard]
            # fused in the checkpoint: shift into this sub-matrix
            offset = sum(self.output_sizes[:shard]) if shard_id is None else 0
            loaded = read_rows(sl, range(rows.start + offset, rows.stop + offset), self.transposed,
                               self.in_features, name)
            copy_checked(param.data.narrow(0, self._local_offset(shard), len(rows)), loaded, name)
            total += loaded.numel() * loaded.element_size()
        return total

    def forward(self, x):
        # x: [tokens, in] -> [tokens, out_local]; no communication
        y = self.matmul.apply(self, x)
        return y if self.bias is None else y + self.bias


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections merged; a rank owns its query heads and the KV heads they use.

    With more ranks than KV heads a KV head may be read by several ranks (replicated).
    """

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, heads: range,
                 kv_heads: range, bias: bool, groups: ParallelGroups, transposed: bool = False):
        def rows(r: range) -> range:
            return range(r.start * head_dim, r.stop * head_dim)

        super().__init__(hidden, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         [rows(heads), rows(kv_heads), rows(kv_heads)], bias, groups, transposed)

    SHARDS = {"q": 0, "k": 1, "v": 2}

    def weight_loader(self, param, sl, name, shard_id=None) -> int:
        return super().weight_loader(param, sl, name, None if shard_id is None else self.SHARDS[shard_id])


class RowParallelLinear(LinearBase):
    """Y = X A with A split by rows (input features); partial sums are all-reduced.

    `input_range` is this rank's slice of the input features (unequal shares are fine: the
    all-reduce sums full output vectors whatever each rank's share was).
    """

    def __init__(self, in_features: int, out_features: int, input_range: range, bias: bool,
                 groups: ParallelGroups, transposed: bool = False):
        if input_range.start < 0 or input_range.stop > in_features:
            raise WeightShapeError(f"input range {input_range} is outside an input of size {in_features}")
        self.full_in = in_features
        self.input_range = input_range
        super().__init__(len(input_range), out_features, bias, groups, transposed)

    def weight_loader(self, param, sl, name, shard_id=None) -> int:
        if param.dim() == 1:   # bias: whole, added once after the all-reduce
            loaded = sl[:]
        else:
            shape = sl.get_shape()
            out_dim = shape[1] if self.transposed else shape[0]
            if out_dim != self.out_features:
                raise WeightShapeError(f"{name}: has shape {shape}, expected output dimension {self.out_features}")
            loaded = read_cols(sl, self.input_range, self.transposed, name)
        copy_checked(param, loaded, name)
        return loaded.numel() * loaded.element_size()

    def forward(self, x):
        # x: [tokens, in_local] -> partial [tokens, out]; sum the partials across the TP group
        y = self.matmul.apply(self, x)
        if self.groups.tp_size > 1:   # checked here, so a compiled step with TP=1 has no graph break
            y = _eager_all_reduce(y, self.groups)
        return y if self.bias is None else y + self.bias
