"""Rotary position embedding with every `rope_type` Hugging Face's Llama supports.

The inverse frequencies come from transformers' own `ROPE_INIT_FUNCTIONS` (linear, dynamic,
yarn, longrope, llama3), so scaled variants match the reference by construction. `dynamic` and
`longrope` are evaluated with the frequencies HF uses inside the original context length; HF
re-derives them per forward beyond it, which Shardline does not (documented gap).
"""

from __future__ import annotations

import torch
from torch import nn


def rope_parameters(hf_config) -> dict:
    """{rope_type, rope_theta, ...} from a transformers 5 (`rope_parameters`) or 4 (`rope_scaling`) config."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(hf_config)
    if params["rope_type"] == "default":
        base = float(params["rope_theta"])
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if params["rope_type"] not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type={params['rope_type']!r} is not supported; supported: default, "
                         f"{', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int):
        super().__init__()
        self.hf_config = hf_config
        self.head_dim = head_dim
        self.inv_freq: torch.Tensor | None = None   # built after meta init, on the real device

    def materialize(self, device: torch.device) -> None:
        inv_freq, self.scaling = rope_inv_freq(self.hf_config, self.head_dim)
        self.inv_freq = inv_freq.to(device)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, 1, D] for the step's positions, computed once and shared by every layer."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype)[:, None, :], (emb.sin() * self.scaling).to(dtype)[:, None, :]


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # x: [T, heads, D] (queries and keys together: one set of ops instead of two); cos, sin: [T, 1, D]
    cos, sin = rope
    return x * cos + rotate_half(x) * sin
