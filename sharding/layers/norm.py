"""Normalisation layers, numerically as Hugging Face computes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sharding.layers.linear import copy_checked


def load_whole(param, sl, name, shard_id=None) -> int:
    loaded = sl[:]
    copy_checked(param, loaded, name)
    return loaded.numel() * loaded.element_size()


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)

    def weight_loader(self, param, sl, name, shard_id=None) -> int:
        return load_whole(param, sl, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:   # one fused op, bit-identical to the lines below in float32
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # as HF Llama: normalise in float32, scale in the model dtype
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class LayerNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden), requires_grad=False)

    def weight_loader(self, param, sl, name, shard_id=None) -> int:
        return load_whole(param, sl, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
