"""`ShardPlan`: which rank owns which layers, heads, KV heads, columns and vocabulary rows.

Pure: it reads a Hugging Face config and (tp, pp) and nothing else. Every loader, layer, KV
cache and worker asks the plan; nobody recomputes a range (no `n // tp` anywhere else).

Any tensor-parallel size T from 1 to num_attention_heads works; shards need not be equal.

- Query heads: when T <= num_key_value_heads, the KV heads are split over the ranks in
  contiguous runs whose lengths differ by at most one, and each rank takes the whole query-head
  group of each of its KV heads (the unit is one KV group; nothing is replicated). When T is
  larger, the query heads themselves are split (the unit is one head) and each rank holds every
  KV head one of its query heads uses - a KV head whose group straddles ranks is replicated on
  each of them, and a rank may hold two KV heads serving unequal numbers of its query heads.
- MLP intermediate columns: contiguous runs differing by at most one column.
- Vocabulary: padded to a multiple of VOCAB_ALIGN rows, split in runs of whole VOCAB_ALIGN
  blocks differing by at most one block; rows >= vocab_size are zero padding.

SmolLM2-135M (30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152) at tp=2, pp=2:

>>> from transformers import LlamaConfig
>>> cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
...                   intermediate_size=1536, vocab_size=49152)
>>> plan = ShardPlan.build(cfg, tp=2, pp=2)
>>> plan.layers(0), plan.layers(1)
(range(0, 15), range(15, 30))
>>> [plan.share(r) for r in range(2)]   # doctest: +NORMALIZE_WHITESPACE
[RankShare(heads=range(0, 6), kv_heads=range(0, 2), columns=range(0, 768), vocab_rows=range(0, 24576)),
 RankShare(heads=range(6, 9), kv_heads=range(2, 3), columns=range(768, 1536), vocab_rows=range(24576, 49152))]

At tp=4 (more ranks than KV heads) KV head 1 serves query heads 3, 4, 5 on ranks 1 and 2:

>>> plan = ShardPlan.build(cfg, tp=4, pp=1)
>>> [(plan.heads(r), plan.kv_heads(r), plan.kv_map(r)) for r in range(4)]   # doctest: +NORMALIZE_WHITESPACE
[(range(0, 3), range(0, 1), (0, 0, 0)), (range(3, 5), range(1, 2), (0, 0)),
 (range(5, 7), range(1, 3), (0, 1)), (range(7, 9), range(2, 3), (0, 0))]
>>> plan.max_kv_heads_per_rank, plan.imbalance()
(2, Imbalance(flops=1.032, kv_bytes=1.6))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from scheduler.errors import ConfigError

# model_type -> family. The family decides which model file builds the stage.
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}

VOCAB_ALIGN = 64
"""Vocabulary shards are whole blocks of this many rows (as vLLM pads its vocabulary)."""

AUTO = "auto"
"""`layer_split="auto"`: the executor sizes stages from the nodes they land on (`cluster.layer_split`)."""


class LayoutError(ConfigError):
    """The requested (tp, pp) layout cannot cut this model; the message lists valid choices."""


class UnsupportedModelError(ConfigError):
    """The model's architecture has no Shardline implementation."""


@dataclass(frozen=True, slots=True)
class ModelDims:
    """The sizes of a model that decide how it can be cut (read from a HF config)."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_hf_config(cls, hf_config) -> ModelDims:
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type={model_type!r} is not supported; supported model types: "
                f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}", "model", model_type)
        if model_type == "gpt2":
            hidden, heads = hf_config.n_embd, hf_config.n_head
            return cls(model_type, hf_config.n_layer, hidden, heads, heads, hidden // heads,
                       hf_config.n_inner or 4 * hidden, hf_config.vocab_size)
        heads = hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(model_type, hf_config.num_hidden_layers, hf_config.hidden_size, heads, kv_heads,
                   head_dim, hf_config.intermediate_size, hf_config.vocab_size)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads


def split_evenly(total: int, parts: int, unit: int = 1) -> tuple[range, ...]:
    """Contiguous ranges covering [0, total) in whole units; counts of units differ by at most one.

    Earlier parts take the remainder. `total` must be a multiple of `unit`.

    >>> split_evenly(10, 3)
    (range(0, 4), range(4, 7), range(7, 10))
    >>> split_evenly(9, 2, unit=3)   # 3 groups of 3 over 2 parts
    (range(0, 6), range(6, 9))
    """
    base, extra = divmod(total // unit, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + (base + (i < extra)) * unit
        ranges.append(range(start, stop))
        start = stop
    return tuple(ranges)


@dataclass(frozen=True, slots=True)
class RankShare:
    """What one TP rank owns, as global index ranges (their lengths are its sizes)."""

    heads: range
    kv_heads: range
    columns: range
    vocab_rows: range


@dataclass(frozen=True, slots=True)
class Imbalance:
    """max / mean over the replica's ranks (1.0 = perfectly even)."""

    flops: float
    """Weight FLOPs per token (projections, MLP, LM head)."""
    kv_bytes: float
    """KV-cache bytes per token."""


@dataclass(frozen=True, slots=True)
class ShardPlan:
    dims: ModelDims
    tp: int
    pp: int
    layer_counts: tuple[int, ...]
    """Layers per pipeline stage, in stage order."""

    @classmethod
    def build(cls, hf_config, tp: int, pp: int, layer_split: tuple[int, ...] | str | None = None) -> ShardPlan:
        """The plan for T=tp, P=pp. `layer_split` None or "auto" (with no cluster to size it
        from) balances the layer counts; a tuple is used verbatim."""
        dims = ModelDims.from_hf_config(hf_config)
        if not isinstance(tp, int) or tp < 1:
            raise LayoutError(f"tensor_parallel_size={tp!r} must be a positive integer", "tensor_parallel_size", tp)
        if not isinstance(pp, int) or pp < 1:
            raise LayoutError(f"pipeline_parallel_size={pp!r} must be a positive integer", "pipeline_parallel_size", pp)
        _check_tp(dims, tp)
        if pp > dims.num_layers:
            raise LayoutError(f"pipeline_parallel_size={pp} exceeds num_hidden_layers={dims.num_layers}; "
                              f"valid sizes: 1 to {dims.num_layers}", "pipeline_parallel_size", pp)
        even = tuple(len(r) for r in split_evenly(dims.num_layers, pp))
        if layer_split is None or layer_split == AUTO:
            counts = even
        else:
            counts = tuple(int(c) for c in layer_split)
            if len(counts) != pp or any(c < 1 for c in counts) or sum(counts) != dims.num_layers:
                raise LayoutError(f"layer_split={list(layer_split)} must have pipeline_parallel_size={pp} "
                                  f"positive entries summing to num_hidden_layers={dims.num_layers}; "
                                  f"e.g. {list(even)}", "layer_split", layer_split)
        return cls(dims, tp, pp, counts)

    # pipeline
    def layers(self, pp_rank: int) -> range:
        """Global indices of the layers stage `pp_rank` runs."""
        start = sum(self.layer_counts[:pp_rank])
        return range(start, start + self.layer_counts[pp_rank])

    def is_first(self, pp_rank: int) -> bool:
        return pp_rank == 0

    def is_last(self, pp_rank: int) -> bool:
        return pp_rank == self.pp - 1

    # tensor parallel: attention
    def heads(self, tp_rank: int) -> range:
        """Query heads of `tp_rank` (global indices)."""
        d = self.dims
        if self.tp <= d.num_kv_heads:   # whole KV groups
            kv = split_evenly(d.num_kv_heads, self.tp)[tp_rank]
            return range(kv.start * d.group_size, kv.stop * d.group_size)
        return split_evenly(d.num_heads, self.tp)[tp_rank]

    def kv_heads(self, tp_rank: int) -> range:
        """KV heads `tp_rank` holds: exactly those its query heads attend with."""
        heads, g = self.heads(tp_rank), self.dims.group_size
        return range(heads.start // g, (heads.stop - 1) // g + 1)

    def kv_map(self, tp_rank: int) -> tuple[int, ...]:
        """For each of the rank's query heads, the index of its KV head among the rank's KV heads."""
        first, g = self.kv_heads(tp_rank).start, self.dims.group_size
        return tuple(h // g - first for h in self.heads(tp_rank))

    @property
    def max_kv_heads_per_rank(self) -> int:
        """The most KV heads any rank holds (sizes the KV-block budget, equal on every rank)."""
        return max(len(self.kv_heads(r)) for r in range(self.tp))

    # tensor parallel: MLP and vocabulary
    def columns(self, tp_rank: int) -> range:
        """MLP intermediate columns of `tp_rank`."""
        return split_evenly(self.dims.intermediate_size, self.tp)[tp_rank]

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary rounded up to whole VOCAB_ALIGN blocks."""
        return -(-self.dims.vocab_size // VOCAB_ALIGN) * VOCAB_ALIGN

    def vocab_rows(self, tp_rank: int) -> range:
        """Rows of the PADDED vocabulary this rank owns; rows >= vocab_size are zero padding."""
        return split_evenly(self.padded_vocab_size, self.tp, VOCAB_ALIGN)[tp_rank]

    @property
    def vocab_shard_sizes(self) -> tuple[int, ...]:
        """Rows per TP rank, in rank order (the LM head's gather needs every rank's size)."""
        return tuple(len(self.vocab_rows(r)) for r in range(self.tp))

    def share(self, tp_rank: int) -> RankShare:
        return RankShare(self.heads(tp_rank), self.kv_heads(tp_rank), self.columns(tp_rank),
                         self.vocab_rows(tp_rank))

    # balance
    def _rank_flops(self, pp_rank: int, tp_rank: int) -> int:
        d, s = self.dims, self.share(tp_rank)
        mlp_mats = 2 if d.model_type == "gpt2" else 3
        per_layer = 2 * d.hidden_size * d.head_dim * (2 * len(s.heads) + 2 * len(s.kv_heads))
        per_layer += 2 * d.hidden_size * mlp_mats * len(s.columns)
        head = 2 * d.hidden_size * len(s.vocab_rows) if self.is_last(pp_rank) else 0
        return self.layer_counts[pp_rank] * per_layer + head

    def imbalance(self) -> Imbalance:
        """max / mean per-rank weight FLOPs and KV bytes per token, over all T x P ranks."""
        ranks = [(p, t) for p in range(self.pp) for t in range(self.tp)]
        flops = [self._rank_flops(p, t) for p, t in ranks]
        kv = [self.layer_counts[p] * len(self.kv_heads(t)) for p, t in ranks]
        return Imbalance(flops=round(max(flops) * len(ranks) / sum(flops), 3),
                         kv_bytes=round(max(kv) * len(ranks) / sum(kv), 3))

    def describe(self) -> str:
        """One line per TP rank and the imbalance (what `LLM(...)` logs)."""
        lines = [f"tp={self.tp} x pp={self.pp}, layers per stage {list(self.layer_counts)}"]
        for r in range(self.tp):
            s = self.share(r)
            lines.append(f"  tp rank {r}: {len(s.heads)} heads {_fmt(s.heads)}, {len(s.kv_heads)} KV heads "
                         f"{_fmt(s.kv_heads)}, {len(s.columns)} MLP columns, {len(s.vocab_rows)} vocabulary rows")
        imb = self.imbalance()
        lines.append(f"  imbalance (max/mean): FLOPs {imb.flops:.3f}, KV bytes {imb.kv_bytes:.3f}")
        return "\n".join(lines)


def _fmt(r: range) -> str:
    return f"[{r.start}, {r.stop})"


def _check_tp(dims: ModelDims, tp: int) -> None:
    """Only what is truly impossible: more ranks than query heads (or than MLP columns)."""
    if dims.num_heads % dims.num_kv_heads:
        raise LayoutError(f"num_attention_heads={dims.num_heads} is not a multiple of "
                          f"num_key_value_heads={dims.num_kv_heads}; the config is inconsistent", "model", None)
    largest = min(dims.num_heads, dims.intermediate_size)
    if tp > largest:
        raise LayoutError(f"tensor_parallel_size={tp} exceeds num_attention_heads={dims.num_heads} (every rank "
                          f"needs at least one head); the largest that works is {largest}", "tensor_parallel_size", tp)


def load_hf_config(model_dir: str | Path):
    """The model's HF config, with a clear error if the folder or config.json is missing."""
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} not found: model must be a Hugging Face model folder "
                                "(run `shardline prepare-model` for the bundled one)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(f"{path}: model_type={model_type!r} is not supported; supported model types: "
                                    f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}", "model", str(path))
    return AutoConfig.from_pretrained(str(path))


def check_layout(model_dir: str | Path, tp: int, pp: int, layer_split=None) -> ShardPlan:
    """Validate a layout against a model folder before any process starts."""
    return ShardPlan.build(load_hf_config(model_dir), tp, pp, layer_split)
