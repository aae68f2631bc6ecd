"""The Llama family (Llama, Mistral, Qwen2, SmolLM2) as one pipeline stage, read top to bottom.

attention -> MLP -> decoder layer -> stage. The parallel layers do the cutting; the only
communication visible here is inside `RowParallelLinear` and the vocabulary-parallel layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sharding.dist import ParallelGroups
from sharding.layers.attention import AttentionMetadata, PagedAttention
from sharding.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from sharding.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sharding.layers.norm import RMSNorm
from sharding.layers.rotary import RotaryEmbedding, rotate
from sharding.plan import ShardPlan


class LlamaAttention(nn.Module):
    def __init__(self, cfg, plan: ShardPlan, groups: ParallelGroups, rotary: RotaryEmbedding):
        super().__init__()
        d = plan.dims
        bias = bool(getattr(cfg, "attention_bias", False)) or d.model_type == "qwen2"
        share = plan.share(groups.tp_rank)
        self.heads, self.kv_heads, self.head_dim = len(share.heads), len(share.kv_heads), d.head_dim
        self.qkv_proj = QKVParallelLinear(d.hidden_size, d.head_dim, d.num_heads, d.num_kv_heads, share.heads,
                                          share.kv_heads, bias, groups)
        self.o_proj = RowParallelLinear(d.num_heads * d.head_dim, d.hidden_size,
                                        range(share.heads.start * d.head_dim, share.heads.stop * d.head_dim),
                                        bool(getattr(cfg, "attention_bias", False)), groups)
        self.rotary = rotary
        self.attn = PagedAttention(self.heads, self.kv_heads, d.head_dim, d.head_dim ** -0.5,
                                   plan.kv_map(groups.tp_rank))

    def project(self, x, meta: AttentionMetadata):
        """x: [T, hidden] -> rotated q [T, H, D], rotated k and v [T, KV, D] (this rank's heads)."""
        # qkv: [T, (H + 2 KV) * D / tp]; queries and keys are adjacent: rotate them together
        qkv = self.qkv_proj(x).view(x.shape[0], self.heads + 2 * self.kv_heads, self.head_dim)
        q, k = rotate(qkv[:, :self.heads + self.kv_heads], meta.rope).split([self.heads, self.kv_heads], dim=1)
        return q, k, qkv[:, self.heads + self.kv_heads:]

    def forward(self, x, kv_cache, meta: AttentionMetadata):
        q, k, v = self.project(x, meta)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta))   # all-reduce inside


class LlamaMLP(nn.Module):
    def __init__(self, cfg, plan: ShardPlan, groups: ParallelGroups):
        super().__init__()
        d = plan.dims
        bias = bool(getattr(cfg, "mlp_bias", False))
        cols = plan.columns(groups.tp_rank)
        self.gate_up_proj = ColumnParallelLinear(d.hidden_size, [d.intermediate_size] * 2, [cols] * 2, bias, groups)
        self.down_proj = RowParallelLinear(d.intermediate_size, d.hidden_size, cols, bias, groups)
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported for Llama-family models; only silu")

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)   # all-reduce inside


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, plan: ShardPlan, groups: ParallelGroups, rotary: RotaryEmbedding):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(plan.dims.hidden_size, eps)
        self.self_attn = LlamaAttention(cfg, plan, groups, rotary)
        self.post_attention_layernorm = RMSNorm(plan.dims.hidden_size, eps)
        self.mlp = LlamaMLP(cfg, plan, groups)

    def forward(self, x, kv_cache, meta):
        # self_attn's parts are called from here so that a compiled decode step (sharding/compiled.py)
        # breaks its graph only at the eager paged attention: dynamo cannot resume inside a nested call
        attn = self.self_attn
        q, k, v = attn.project(self.input_layernorm(x), meta)
        x = x + attn.o_proj(attn.attn(q, k, v, kv_cache, meta))   # all-reduce inside o_proj
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    """`model.*` in the checkpoint: embeddings (first stage), this stage's layers, final norm (last)."""

    def __init__(self, cfg, plan: ShardPlan, groups: ParallelGroups, rotary: RotaryEmbedding):
        super().__init__()
        d = plan.dims
        pp_rank = groups.pp_rank
        if plan.is_first(pp_rank):
            self.embed_tokens = VocabParallelEmbedding(d.vocab_size, plan.vocab_shard_sizes, d.hidden_size, groups)
        # keyed by global layer index, so parameter names match the checkpoint's
        self.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(cfg, plan, groups, rotary)
                                     for i in plan.layers(pp_rank)})
        if plan.is_last(pp_rank):
            self.norm = RMSNorm(d.hidden_size, cfg.rms_norm_eps)


class LlamaStage(nn.Module):
    # checkpoint name fragment -> (our fragment, shard id) for merged projections
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg, plan: ShardPlan, groups: ParallelGroups):
        super().__init__()
        self.plan, self.groups = plan, groups
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.rotary = RotaryEmbedding(cfg, plan.dims.head_dim)
        self.model = LlamaBody(cfg, plan, groups, self.rotary)
        if plan.is_last(groups.pp_rank):
            d = plan.dims
            self.lm_head = ParallelLMHead(d.vocab_size, plan.vocab_shard_sizes, d.hidden_size, groups)

    def checkpoint_names(self, param_name: str) -> list[tuple[str, object]]:
        """Checkpoint tensors feeding one of our parameters, with the shard id for each."""
        if param_name == "lm_head.weight" and self.tied:
            return [("model.embed_tokens.weight", None)]
        merged = [(param_name.replace(ours, ckpt), shard)
                  for ckpt, (ours, shard) in self.packed_modules.items() if f".{ours}." in param_name]
        return merged or [(param_name, None)]

    def materialize(self, device: torch.device) -> None:
        self.rotary.materialize(device)

    def tied_embedding(self) -> VocabParallelEmbedding | None:
        """The embedding the LM head shares its weight with, if tied and on this stage."""
        return getattr(self.model, "embed_tokens", None) if self.tied else None

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def forward(self, x, kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, hidden]; kv_caches[i] belongs to this stage's i-th layer
        meta.rope = self.rotary.cos_sin(meta.positions, x.dtype)
        for layer, cache in zip(self.model.layers.values(), kv_caches):
            x = layer(x, cache, meta)
        if self.plan.is_last(self.groups.pp_rank):
            x = self.model.norm(x)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
