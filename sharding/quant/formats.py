"""Quantized weight formats and their exact dequantization (the reference every kernel is held to).

A weight is the layer's local slice, [out, in] like `nn.Linear`.
- int8 (also w8a8's weights): q int8 [out, in], scale fp32 [out]; w ~= q * scale.
- int4: packed uint8 [out, in / 2] (even column in the low nibble), scale and zero fp32
  [out, in / group]; w ~= (q - 8) * scale + zero, q in [0, 15]. This is the layout
  `torch.ops.aten._weight_int4pack_mm_for_cpu` expects (scales and zeros side by side).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_TINY = 1e-12   # an all-zero row (vocabulary padding) gets a harmless scale instead of 0/0


@dataclass
class QuantizedWeight:
    kind: str                       # "int8" or "int4" (w8a8 stores int8)
    q: torch.Tensor                 # int8 [out, in] or packed uint8 [out, in/2]
    scale: torch.Tensor             # fp32 [out] or [out, groups]
    zero: torch.Tensor | None = None
    group_size: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        out, cols = self.q.shape
        return (out, cols * 2) if self.kind == "int4" else (out, cols)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.zero) if t is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors as written to a pre-quantized folder (suffixes of the weight's name)."""
        out = {"q": self.q, "scale": self.scale}
        if self.zero is not None:
            out["zero"] = self.zero
        return out


def quantize_int8(w: torch.Tensor, row_amax: torch.Tensor | None = None) -> QuantizedWeight:
    """Symmetric per-output-channel int8: the largest |w| of each row maps to 127.

    `row_amax` overrides the rows' largest |w| (a row-parallel slice passes its whole row's).
    """
    w = w.float()
    amax = w.abs().amax(dim=1) if row_amax is None else row_amax
    scale = (amax / 127).clamp_min(_TINY)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", q, scale)


def quantize_int4(w: torch.Tensor, group_size: int) -> QuantizedWeight:
    """Asymmetric 4-bit per group of `group_size` input features: min -> 0, max -> 15."""
    out, inp = w.shape
    if inp % group_size or inp % 2:
        raise ValueError(f"input size {inp} is not a multiple of the int4 group size {group_size}")
    g = w.float().reshape(out, inp // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp_min(_TINY)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).reshape(out, inp)
    return QuantizedWeight("int4", pack_int4(q), scale, lo + 8 * scale, group_size)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values in [0, 15] -> [out, in/2] bytes, even column in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: [out, in/2] uint8 -> [out, in] uint8 in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the quantized one stands for, [out, in] in `dtype`."""
    if qw.kind == "int8":
        return (qw.q.float() * qw.scale[:, None]).to(dtype)
    out, inp = qw.shape
    q = unpack_int4(qw.q).float().reshape(out, inp // qw.group_size, qw.group_size)
    return ((q - 8) * qw.scale[..., None] + qw.zero[..., None]).reshape(out, inp).to(dtype)


def quantize(w: torch.Tensor, kind: str, group_size: int = 0,
             row_amax: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize one weight slice for a method kind ("int8", "int4" or "w8a8")."""
    if kind == "int4":
        return quantize_int4(w, group_size)
    return quantize_int8(w, row_amax)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: x [T, in] -> (int8 [T, in], fp32 scale [T, 1])."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / 127).clamp_min(_TINY)
    return torch.round(x.float() / scale).clamp_(-127, 127).to(torch.int8), scale
