"""GPT-2 as one pipeline stage: learned positions, LayerNorm, Conv1D weights, gelu_new, tied head.

GPT-2's checkpoint stores `Conv1D` weights as [in, out]; the parallel layers are built with
`transposed=True` so each rank reads its slice along the right axis. The fused `c_attn` holds
Q, K and V side by side; `QKVParallelLinear` takes each rank's heads from each of the three.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sharding.dist import ParallelGroups
from sharding.layers.attention import AttentionMetadata, PagedAttention
from sharding.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from sharding.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, copy_checked
from sharding.layers.norm import LayerNorm
from sharding.plan import ShardPlan


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Attention(nn.Module):
    def __init__(self, cfg, plan: ShardPlan, groups: ParallelGroups, layer_idx: int):
        super().__init__()
        d = plan.dims
        share = plan.share(groups.tp_rank)   # no GQA: KV heads are the query heads
        self.heads, self.head_dim = len(share.heads), d.head_dim
        self.c_attn = QKVParallelLinear(d.hidden_size, d.head_dim, d.num_heads, d.num_heads, share.heads,
                                        share.kv_heads, True, groups, transposed=True)
        self.c_proj = RowParallelLinear(d.hidden_size, d.hidden_size,
                                        range(share.heads.start * d.head_dim, share.heads.stop * d.head_dim),
                                        True, groups, transposed=True)
        scale = d.head_dim ** -0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.attn = PagedAttention(self.heads, self.heads, d.head_dim, scale)

    def project(self, x):
        """x: [T, hidden] -> q, k, v [T, H, D] (this rank's heads)."""
        q, k, v = (t.view(-1, self.heads, self.head_dim) for t in self.c_attn(x).chunk(3, dim=-1))
        return q, k, v

    def forward(self, x, kv_cache, meta: AttentionMetadata):
        return self.c_proj(self.attn(*self.project(x), kv_cache, meta))   # all-reduce inside


class GPT2MLP(nn.Module):
    def __init__(self, cfg, plan: ShardPlan, groups: ParallelGroups):
        super().__init__()
        d = plan.dims
        cols = plan.columns(groups.tp_rank)
        self.c_fc = ColumnParallelLinear(d.hidden_size, [d.intermediate_size], [cols], True, groups, transposed=True)
        self.c_proj = RowParallelLinear(d.intermediate_size, d.hidden_size, cols, True, groups, transposed=True)
        if getattr(cfg, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function={cfg.activation_function!r} is not supported for GPT-2; "
                             "supported: gelu_new, gelu_pytorch_tanh")

    def forward(self, x):
        return self.c_proj(gelu_new(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg, plan: ShardPlan, groups: ParallelGroups, layer_idx: int):
        super().__init__()
        h, eps = plan.dims.hidden_size, cfg.layer_norm_epsilon
        self.ln_1 = LayerNorm(h, eps)
        self.attn = GPT2Attention(cfg, plan, groups, layer_idx)
        self.ln_2 = LayerNorm(h, eps)
        self.mlp = GPT2MLP(cfg, plan, groups)

    def forward(self, x, kv_cache, meta):
        # attention's parts are called from here so that a compiled decode step (sharding/compiled.py)
        # breaks its graph only at the eager paged attention: dynamo cannot resume inside a nested call
        attn = self.attn
        q, k, v = attn.project(self.ln_1(x))
        x = x + attn.c_proj(attn.attn(q, k, v, kv_cache, meta))   # all-reduce inside c_proj
        return x + self.mlp(self.ln_2(x))


class GPT2Body(nn.Module):
    """`transformer.*` in the checkpoint."""

    def __init__(self, cfg, plan: ShardPlan, groups: ParallelGroups):
        super().__init__()
        d = plan.dims
        if plan.is_first(groups.pp_rank):
            self.wte = VocabParallelEmbedding(d.vocab_size, plan.vocab_shard_sizes, d.hidden_size, groups)
            # positions are few: every rank keeps all of them
            self.wpe = nn.Parameter(torch.empty(cfg.n_positions, d.hidden_size), requires_grad=False)
        self.h = nn.ModuleDict({str(i): GPT2Block(cfg, plan, groups, i) for i in plan.layers(groups.pp_rank)})
        if plan.is_last(groups.pp_rank):
            self.ln_f = LayerNorm(d.hidden_size, cfg.layer_norm_epsilon)

    def weight_loader(self, param, sl, name, shard_id=None) -> int:   # only wpe is owned directly
        loaded = sl[:]
        copy_checked(param, loaded, name)
        return loaded.numel() * loaded.element_size()


class GPT2Stage(nn.Module):
    def __init__(self, cfg, plan: ShardPlan, groups: ParallelGroups):
        super().__init__()
        self.plan, self.groups = plan, groups
        self.transformer = GPT2Body(cfg, plan, groups)
        if plan.is_last(groups.pp_rank):
            d = plan.dims
            self.lm_head = ParallelLMHead(d.vocab_size, plan.vocab_shard_sizes, d.hidden_size, groups)

    def checkpoint_names(self, param_name: str) -> list[tuple[str, object]]:
        if param_name == "lm_head.weight":   # GPT-2 always ties its head to wte
            return [("transformer.wte.weight", None)]
        if param_name == "transformer.wpe":
            return [("transformer.wpe.weight", None)]
        return [(param_name, None)]

    def materialize(self, device: torch.device) -> None:
        pass

    def tied_embedding(self) -> VocabParallelEmbedding | None:
        """GPT-2 always ties its head to wte; shared when wte is on this stage."""
        return getattr(self.transformer, "wte", None)

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(ids) + self.transformer.wpe[positions]

    def forward(self, x, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        for block, cache in zip(self.transformer.h.values(), kv_caches):
            x = block(x, cache, meta)
        if self.plan.is_last(self.groups.pp_rank):
            x = self.transformer.ln_f(x)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
