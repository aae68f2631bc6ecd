"""Candidate implementations of one quantized matmul, y = x W^T with W the layer's quantized slice.

Each kernel is built once from a `QuantizedWeight` (packing it the way its op wants) and then
called with x [tokens, in] in the model dtype, returning [tokens, out] in the same dtype. Which
one a layer uses is decided by measurement (`sharding.quant.select`); the `Dequant*` kernels run
everywhere and define what the method computes, so they are the reference the others are held to.

    method  candidates (fastest exact-enough one wins, per weight shape)
    int8    int8pack_mm (aten._weight_int8pack_mm), dequant
    int4    dequant (aten's int4pack_mm is not offered: see CANDIDATES)
    w8a8    fbgemm_outliers (the call's 8 loudest input channels dense, the rest through
            quantized.linear_dynamic on rows scaled to one range: 7-bit per token),
            fbgemm_fp16 (the int8 weight's values in fp16, activations unrounded), dequant
            (not candidates any more, kept to measure against: fbgemm_per_token without the
            outlier channels, +8 % perplexity on SmolLM2; fbgemm_dynamic, what `quantize_dynamic`
            runs, one 7-bit range per call; int_mm, torch._int_mm, 100x slower at batch 64 here)
    w8a8_wo w8a8's weight-only layers (the MLP output projection): fbgemm_fp16, int8pack_mm, dequant

The selector picks one kernel per batch-size bucket (`sharding.quant.select`), so a layer may
run fbgemm_fp16 in batch-1 decode and fbgemm_outliers on a prefill or a wide batch.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from sharding.quant.formats import QuantizedWeight, dequantize, quantize_activations


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class DequantMatmul:
    """Weight-only reference: dequantize the slice on every call, then a dense matmul (portable)."""

    name = "dequant"

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        self.qw, self.dtype = qw, dtype
        self.nbytes = qw.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.qw, self.dtype))


class DequantW8A8:
    """w8a8 reference: per-token int8 activations times int8 weights, computed in fp32."""

    name = "dequant"

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        self.qw, self.dtype = qw, dtype
        self.nbytes = qw.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_activations(x)
        return F.linear(xq.float() * xs, dequantize(self.qw)).to(self.dtype)


class Int8PackMM:
    name = "int8pack_mm"

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        self.q, self.scale = qw.q.contiguous(), qw.scale.to(dtype)
        self.nbytes = _nbytes(self.q, self.scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.q, self.scale)


class FbgemmDynamic:
    """fbgemm's dynamic int8 linear (x86): prepacked int8 weights, activations quantized per call."""

    name = "fbgemm_dynamic"

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        out = qw.q.shape[0]
        zeros = torch.zeros(out, dtype=torch.long)
        with warnings.catch_warnings():   # quantized tensor types are deprecated; fbgemm's op is not (yet)
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(qw.q, qw.scale.double(), zeros, 0)
        self.packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.dtype = dtype
        self.nbytes = qw.nbytes   # the prepacked copy is opaque; it holds the same int8 values and scales

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range: 7-bit activations, as quantize_dynamic uses on x86 to avoid int16 overflow
        return torch.ops.quantized.linear_dynamic(x.float(), self.packed, True).to(self.dtype)


class FbgemmPerToken(FbgemmDynamic):
    """fbgemm's dynamic int8 linear with activations quantized per token.

    fbgemm picks one activation range per call; dividing each token's row by its own max |x|
    first (and multiplying the output row back, exact since the matmul is linear) makes that
    one range fit every token, so a prefill's loud tokens no longer crush the quiet ones.
    """

    name = "fbgemm_per_token"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
        return (torch.ops.quantized.linear_dynamic(x / amax, self.packed, True) * amax).to(self.dtype)


class FbgemmOutliers(FbgemmPerToken):
    """LLM.int8()-style decomposition around fbgemm: the `OUTLIER_CHANNELS` input channels loudest
    in this call go through a small dense matmul, the rest through per-token fbgemm.

    SmolLM2's activations have a few channels 10-100x louder than the rest; with them in, each
    token's 7-bit range leaves the quiet channels a handful of levels (+8 % perplexity); taken
    out, the range fits the rest (measured: README Precision). The outlier rows of the int8
    weight are dequantized per call from an [in, out] copy, so the method holds 2 bytes per weight.
    """

    name = "fbgemm_outliers"

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        super().__init__(qw, dtype)
        self.qt, self.scale = qw.q.t().contiguous(), qw.scale   # [in, out] int8: a channel is a row
        self.k = min(OUTLIER_CHANNELS, self.qt.shape[0])
        self.nbytes = qw.nbytes + _nbytes(self.qt)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        idx = x.abs().amax(dim=0).topk(self.k).indices               # this call's loudest channels
        # [T, k] x [k, out], the weight scale applied to the [T, out] product rather than to the
        # [k, out] rows (index_select: aten::index took 74 us a call in a batch-1 decode profile)
        loud = x.index_select(1, idx) @ self.qt.index_select(0, idx).float()
        rest = x.index_fill(1, idx, 0.0)
        if x.shape[0] == 1:   # one token: fbgemm's per-call range is already the token's own
            return torch.addcmul(torch.ops.quantized.linear_dynamic(rest, self.packed, True),
                                 loud, self.scale).to(self.dtype)
        amax = rest.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12)
        y = torch.ops.quantized.linear_dynamic(rest.div_(amax), self.packed, True).mul_(amax)
        return y.addcmul_(loud, self.scale).to(self.dtype)


class FbgemmFp16:
    """fbgemm's fp16-weight GEMM (`quantized.linear_dynamic_fp16`): the int8 weight's values
    (q * scale) held in fp16, activations left in fp32.

    AVX2 has no fast int8 x fp32 product (aten's int8pack_mm is 3-40x slower than dense here),
    but F16C converts fp16 weights on the fly: at batch 1 this reads half of fp32's bytes with
    none of w8a8's per-call activation rounding, top-k and gathers (benchmarks/NOTES.md 6b).
    fp16 keeps 11 significant bits, so its values are within 2^-11 of the int8 weight's (~2e-4
    relative error in the output, inside every method's tolerance). 2 bytes per weight.
    """

    name = "fbgemm_fp16"

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        self.packed = torch.ops.quantized.linear_prepack_fp16(dequantize(qw), None)
        self.dtype = dtype
        out, inp = qw.shape
        self.nbytes = 2 * out * inp   # the packed fp16 copy is opaque: its values' bytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self.packed).to(self.dtype)


class DequantOutliers:
    """w8a8 reference: `FbgemmOutliers`' decomposition with per-token 8-bit activations in fp32."""

    name = "dequant"

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        self.qw, self.dtype = qw, dtype
        self.k = min(OUTLIER_CHANNELS, qw.shape[1])
        self.nbytes = qw.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x, w = x.float(), dequantize(self.qw)
        idx = x.abs().amax(dim=0).topk(self.k).indices
        rest = x.index_fill(1, idx, 0.0)
        xq, xs = quantize_activations(rest)
        return (F.linear(xq.float() * xs, w) + x[:, idx] @ w[:, idx].t()).to(self.dtype)


class IntMM:
    """Per-token int8 activations through torch._int_mm (int8 x int8 -> int32), rescaled in fp32."""

    name = "int_mm"

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype):
        self.qt = qw.q.t().contiguous()            # [in, out]
        self.scale, self.dtype = qw.scale, dtype
        self.nbytes = _nbytes(self.qt, self.scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xq, xs = quantize_activations(x)
        return (torch._int_mm(xq, self.qt).float() * xs * self.scale).to(self.dtype)


# w8a8: input channels per call kept out of activation quantization (of 576 on SmolLM2)
OUTLIER_CHANNELS = 8

CANDIDATES = {
    "int8": [Int8PackMM, DequantMatmul],
    # aten's int4pack_mm (_weight_int4pack_mm_for_cpu) is not offered (removed): it passes the
    # per-matmul check, but on the tiny test models its greedy logprobs drift up to 1.45e-4 from HF
    # on the dequantized weights, past the 1e-4 standard (tests/unit/test_quant.py failed 4 runs in
    # 5 when timing picked it); it also lost 25-200x at batch 32 on this CPU
    "int4": [DequantMatmul],
    # fbgemm_fp16 (2 bytes per weight) only in the speed-first mode: the memory-first int8 keeps 1
    "w8a8": [FbgemmOutliers, FbgemmFp16, DequantOutliers],
    "w8a8_wo": [FbgemmFp16, Int8PackMM, DequantMatmul],
}
REFERENCE = {"int8": DequantMatmul, "int4": DequantMatmul, "w8a8": DequantOutliers, "w8a8_wo": DequantMatmul}
# relative L2 error against the reference above which a candidate is not "exact enough":
# weight-only kernels differ only in summation order; fbgemm's per-call 7-bit activations are
# coarser than the reference's per-token 8-bit ones, by design of that kernel
TOLERANCE = {"int8": 1e-3, "int4": 1e-3, "w8a8": 3e-2, "w8a8_wo": 1e-3}
# w8a8 candidates round activations differently from the reference (fbgemm: 7-bit, to avoid
# int16 overflow in AVX2's vpmaddubsw); each token's error against the unquantized-activation
# matmul may be this multiple of the reference's own (per-token 8-bit) error: 7-bit per token
# is ~2x, one range per call is 10-100x on quiet tokens and is rejected
W8A8_ERROR_FACTOR = 3.0
# bf16 activations round every product; give all kernels bf16's own resolution
BF16_TOLERANCE = 2e-2
