"""Quantized weight formats and their exact dequantization (the reference every kernel is held to).

A weight is the layer's local slice, [out, in] like `nn.Linear`.
- int8 (also w8a8's weights): q int8 [out, in], scale fp32 [out]; w ~= q * scale.
- int4: packed uint8 [out, in / 2] (even column in the low nibble), scale and low fp16
  [out, in / group]; w ~= q * scale + low, q in [0, 15]. fp16, not fp32: at group 32 the two
  fp32 numbers would cost 2 of every 6 bits (5.3x smaller than fp32), in fp16 1 of 5 (6.4x).
  The value is computed from the fp16-rounded scale and low, so what is stored is exactly what
  was chosen.

int4 rounding without calibration data: per group, a few clipped ranges [low, high] are tried
(the extremes pulled towards 0, as AWQ's clipping search does with activations), then the best
one's scale and low are refitted by least squares to its q (HQQ's update for fixed q); per group
the smallest weight reconstruction error wins, so it is never worse than min-max.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_TINY = 1e-12   # an all-zero row (vocabulary padding) gets a harmless scale instead of 0/0
_TINY_FP16 = 2.0 ** -24   # the smallest fp16 (subnormal): an all-zero int4 group's scale
# int4 clipping search: fractions of each group's min/max kept (1.0 = plain min-max first)
# (a short grid: load time grows with it. On SmolLM2 at group 64 a 6-range grid with a refit
# of each took perplexity from +23.9 % to +18.4 % of fp32's for 13x min-max's time; this one
# refits only the winner. At group 32 min-max is already exact there: README Precision)
INT4_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8)


@dataclass
class QuantizedWeight:
    kind: str                       # "int8" or "int4" (w8a8 stores int8)
    q: torch.Tensor                 # int8 [out, in] or packed uint8 [out, in/2]
    scale: torch.Tensor             # int8: fp32 [out]; int4: fp16 [out, groups]
    low: torch.Tensor | None = None  # int4: fp16 [out, groups], the value q = 0 stands for
    group_size: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        out, cols = self.q.shape
        return (out, cols * 2) if self.kind == "int4" else (out, cols)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.low) if t is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors as written to a pre-quantized folder (suffixes of the weight's name)."""
        out = {"q": self.q, "scale": self.scale}
        if self.low is not None:
            out["low"] = self.low
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


def quantize_int4(w: torch.Tensor, group_size: int, search: bool = True) -> QuantizedWeight:
    """Asymmetric 4-bit per group of `group_size` input features, fp16 scale and low per group.

    search=False is plain min-max rounding (min -> 0, max -> 15); True also tries clipped
    ranges and a least-squares refit, keeping per group whichever reconstructs w best.
    Every candidate maps the group's extremes to q = 0 and 15, so quantizing a dequantized
    weight again gives back the same values (min-max is then exact and tried first): a
    `shardline quantize` folder reloads to what was stored.
    """
    out, inp = w.shape
    if inp % group_size or inp % 2:
        raise ValueError(f"input size {inp} is not a multiple of the int4 group size {group_size}")
    g = w.float().reshape(out, inp // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    best = None
    for frac in INT4_CLIP_GRID if search else (1.0,):
        # pull each extreme towards 0 (an extreme on the far side of 0 stays put)
        cand = _int4_fit(g, torch.where(lo < 0, lo * frac, lo), torch.where(hi > 0, hi * frac, hi))
        best = cand if best is None else _better(best, cand)
    if search:
        best = _better(best, _int4_refit(g, best[0]))
    q, scale, low, _ = best
    return QuantizedWeight("int4", pack_int4(q.reshape(out, inp)), scale, low, group_size)


def _int4_error(g: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor):
    """(q, scale, low, squared error per group), computed as `dequantize` computes the value."""
    err = (q.float() * scale.float()[..., None] + low.float()[..., None] - g).square_().sum(dim=-1)
    return q, scale, low, err


def _int4_fit(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Round g onto the 16 levels from lo to hi (fp16 scale and low; values outside are clipped)."""
    scale, low = ((hi - lo) / 15).clamp_min(_TINY_FP16).half(), lo.half()
    q = torch.round((g - low.float()[..., None]) / scale.float()[..., None]).clamp_(0, 15).to(torch.uint8)
    return _int4_error(g, q, scale, low)


def _int4_refit(g: torch.Tensor, q: torch.Tensor):
    """Least-squares scale and low for fixed q (w ~= q * scale + low per group)."""
    qf = q.float()
    qm, gm = qf.mean(dim=-1, keepdim=True), g.mean(dim=-1, keepdim=True)
    var = (qf - qm).square().sum(dim=-1)
    scale = (((qf - qm) * (g - gm)).sum(dim=-1) / var.clamp_min(1e-12)).clamp_min(_TINY_FP16)
    low = gm.squeeze(-1) - scale * qm.squeeze(-1)
    return _int4_error(g, q, scale.half(), low.half())


def _better(a, b):
    """Per group, the candidate (q, scale, low, err) with the smaller error (a on a tie)."""
    take = b[3] < a[3]
    return (torch.where(take[..., None], b[0], a[0]), torch.where(take, b[1], a[1]),
            torch.where(take, b[2], a[2]), torch.where(take, b[3], a[3]))


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
    return (q * qw.scale.float()[..., None] + qw.low.float()[..., None]).reshape(out, inp).to(dtype)


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
