"""`ShardPlan`: which rank owns which layers, heads, columns and vocabulary rows.

Pure: it reads a Hugging Face config and (tp, pp) and nothing else. Every loader, layer and
worker asks the plan; nobody recomputes a range.

Example, SmolLM2-135M (30 layers, 9 heads, 3 KV heads, intermediate 1536, vocab 49152) at
tp=3, pp=2:

    stage 0 owns layers [0, 15), stage 1 owns [15, 30)
    tp rank 1 owns heads [3, 6), KV heads [1, 2), MLP columns [512, 1024),
    vocabulary rows [16384, 32768) of the (unpadded, since 3 divides 49152) vocabulary
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from scheduler.errors import ConfigError

# model_type -> family. The family decides which model file builds the stage.
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "gpt2": "gpt2"}


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


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _split_evenly(total: int, parts: int) -> tuple[int, ...]:
    """[10 layers, 3 stages] -> (4, 3, 3): earlier stages take the remainder."""
    base, extra = divmod(total, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


@dataclass(frozen=True, slots=True)
class ShardPlan:
    dims: ModelDims
    tp: int
    pp: int
    layer_counts: tuple[int, ...]
    """Layers per pipeline stage, in stage order."""

    @classmethod
    def build(cls, hf_config, tp: int, pp: int, layer_split: tuple[int, ...] | None = None) -> ShardPlan:
        dims = ModelDims.from_hf_config(hf_config)
        if not isinstance(tp, int) or tp < 1:
            raise LayoutError(f"tensor_parallel_size={tp!r} must be a positive integer", "tensor_parallel_size", tp)
        if not isinstance(pp, int) or pp < 1:
            raise LayoutError(f"pipeline_parallel_size={pp!r} must be a positive integer", "pipeline_parallel_size", pp)
        for what, n in (("num_attention_heads", dims.num_heads), ("num_key_value_heads", dims.num_kv_heads),
                        ("intermediate_size", dims.intermediate_size)):
            if n % tp:
                valid = sorted(set(_divisors(dims.num_heads)) & set(_divisors(dims.num_kv_heads))
                               & set(_divisors(dims.intermediate_size)))
                raise LayoutError(f"tensor_parallel_size={tp} does not divide {what}={n}; "
                                  f"valid sizes: {', '.join(map(str, valid))}", "tensor_parallel_size", tp)
        if pp > dims.num_layers:
            raise LayoutError(f"pipeline_parallel_size={pp} exceeds num_hidden_layers={dims.num_layers}; "
                              f"valid sizes: 1 to {dims.num_layers}", "pipeline_parallel_size", pp)
        if layer_split is None:
            counts = _split_evenly(dims.num_layers, pp)
        else:
            counts = tuple(int(c) for c in layer_split)
            if len(counts) != pp or any(c < 1 for c in counts) or sum(counts) != dims.num_layers:
                raise LayoutError(f"layer_split={list(layer_split)} must have pipeline_parallel_size={pp} "
                                  f"positive entries summing to num_hidden_layers={dims.num_layers}; "
                                  f"e.g. {list(_split_evenly(dims.num_layers, pp))}", "layer_split", layer_split)
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

    # tensor parallel
    @property
    def heads_per_rank(self) -> int:
        return self.dims.num_heads // self.tp

    @property
    def kv_heads_per_rank(self) -> int:
        return self.dims.num_kv_heads // self.tp

    @property
    def intermediate_per_rank(self) -> int:
        return self.dims.intermediate_size // self.tp

    def heads(self, tp_rank: int) -> range:
        return range(tp_rank * self.heads_per_rank, (tp_rank + 1) * self.heads_per_rank)

    def kv_heads(self, tp_rank: int) -> range:
        return range(tp_rank * self.kv_heads_per_rank, (tp_rank + 1) * self.kv_heads_per_rank)

    def columns(self, total: int, tp_rank: int) -> range:
        """This rank's contiguous share of a dimension of size `total` (tp must divide it)."""
        if total % self.tp:
            raise LayoutError(f"tensor_parallel_size={self.tp} does not divide a dimension of size {total}")
        per = total // self.tp
        return range(tp_rank * per, (tp_rank + 1) * per)

    # vocabulary
    @property
    def vocab_per_rank(self) -> int:
        return math.ceil(self.dims.vocab_size / self.tp)

    @property
    def padded_vocab_size(self) -> int:
        """Vocabulary padded so every TP rank holds the same number of rows."""
        return self.vocab_per_rank * self.tp

    def vocab_rows(self, tp_rank: int) -> range:
        """Rows of the PADDED vocabulary this rank owns; rows >= vocab_size are zero padding."""
        return range(tp_rank * self.vocab_per_rank, (tp_rank + 1) * self.vocab_per_rank)


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


def check_layout(model_dir: str | Path, tp: int, pp: int, layer_split: tuple[int, ...] | None = None) -> ShardPlan:
    """Validate a layout against a model folder before any process starts."""
    return ShardPlan.build(load_hf_config(model_dir), tp, pp, layer_split)
