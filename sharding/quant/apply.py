"""Quantize one loaded stage in place: each rank quantizes only its own slices.

`quantize_stage` walks the stage's linear layers (and, for w8a8, the LM head), quantizes each
weight slice exactly as loaded (so per-output-channel scales follow TP column splits, and
groups of a row-parallel slice stay inside that rank's columns), swaps the layer's `matmul`
for a `QuantizedMatmul` holding the kernel chosen by measurement for that shape, and drops
the full-precision weight (kept only when it is also a tied embedding's weight).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from sharding.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from sharding.layers.linear import DenseMatmul, LinearBase, RowParallelLinear
from sharding.quant.formats import quantize
from sharding.quant.select import KernelChoice, build_chosen, choose_kernel
from sharding.quant.spec import QuantizationError, QuantSpec, largest_group_size, parse_method

# the throughput benchmark's batch is 64 wide; larger engine batches are timed at this size
MAX_TIMED_BATCH = 64


class QuantizedMatmul(DenseMatmul):
    """A layer's matmul through a quantized kernel; the layer's own weight is no longer read."""

    def __init__(self, kernel, kernel_name: str):
        self.kernel, self.kernel_name = kernel, kernel_name

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = self.kernel(x.reshape(-1, x.shape[-1]))
        return y.reshape(*lead, y.shape[-1])


@dataclass
class QuantReport:
    """What one rank quantized, with which kernels, and the weight bytes it holds afterwards."""

    method: str
    layers: int = 0
    linear_weight_bytes: int = 0           # the decoder layers' linear weights (what int8/int4 shrink)
    dense_linear_weight_bytes: int = 0     # the same weights before quantization
    lm_head_bytes: int = 0                 # LM head bytes beyond a tied embedding's (0 when tied and dense)
    kept_dense: list[str] = field(default_factory=list)
    kernels: dict[str, dict] = field(default_factory=dict)     # "out x in" -> KernelChoice.to_dict()

    def to_dict(self) -> dict:
        return asdict(self)


def quantizable_layers(stage: nn.Module, spec: QuantSpec):
    """(name, module) of every layer this method quantizes on this stage."""
    for name, module in stage.named_modules():
        if isinstance(module, LinearBase) or (spec.quantizes_lm_head and isinstance(module, ParallelLMHead)):
            yield name, module


def kernel_kind(name: str, layer: nn.Module, spec: QuantSpec) -> str:
    """The kernels a layer uses: w8a8 keeps the MLP's output projection out of activation rounding.

    Its input (the gated MLP activation, 1536 wide on SmolLM2) has the loudest, most token-
    dependent channels: with 7-bit activations there it costs ~1 point of perplexity more than
    all the other layers together leave (measured: README Precision), so it runs int8 weight-only
    ("w8a8_wo": int8's candidates plus fbgemm's fp16-weight GEMM, speed before memory).
    """
    if spec.kind == "w8a8" and isinstance(layer, RowParallelLinear) and ".mlp." in f".{name}":
        return "w8a8_wo"
    return spec.kind


def check_group_size(stage: nn.Module, spec: QuantSpec, where: str) -> None:
    """int4 groups must tile every layer's local input slice; say which group size would."""
    if spec.kind != "int4":
        return
    sizes = {name: m.weight.shape[1] for name, m in quantizable_layers(stage, spec)}
    bad = {n: s for n, s in sizes.items() if s % spec.group_size}
    if bad:
        name, size = next(iter(bad.items()))
        best = largest_group_size(list(sizes.values()))
        fix = (f"use quantization='int4-g{best}' (the largest group size dividing every slice)" if best
               else "no supported group size (32, 64, 128) divides every slice; use int8 or w8a8")
        raise QuantizationError(f"quantization={spec.name!r}: group size {spec.group_size} does not divide the "
                                f"{size} input features of {name} on {where}; {fix}")


def _whole_row_amax(layer: nn.Module, spec: QuantSpec) -> torch.Tensor | None:
    """A row-parallel slice holds part of each output row: its int8 scale is the whole row's.

    The max over the TP group makes every layout (and a pre-quantized folder, whose scales are
    whole-row) quantize to the same values. int4 groups lie inside one rank's columns already.
    """
    if spec.kind == "int4" or not isinstance(layer, RowParallelLinear) or layer.groups.tp_group is None:
        return None
    import torch.distributed as dist

    amax = layer.weight.float().abs().amax(dim=1)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=layer.groups.tp_group)
    return amax


def weight_bytes(stage: nn.Module) -> tuple[int, int]:
    """(decoder linear weight bytes, LM head bytes beyond a tied embedding) of a dense stage."""
    tied = _tied_ids(stage)
    linear = sum(_nbytes(m.weight) for m in stage.modules() if isinstance(m, LinearBase))
    head = sum(_nbytes(m.weight) for m in stage.modules()
               if isinstance(m, ParallelLMHead) and id(m.weight) not in tied)
    return linear, head


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _tied_ids(stage: nn.Module) -> set[int]:
    return {id(m.weight) for m in stage.modules() if type(m) is VocabParallelEmbedding}


@torch.inference_mode()
def quantize_stage(stage: nn.Module, spec: QuantSpec | str, batch_size: int, where: str = "this rank") -> QuantReport:
    """Quantize every quantizable layer of a loaded stage in place; returns what was done."""
    spec = parse_method(spec) if isinstance(spec, str) else spec
    check_group_size(stage, spec, where)
    report = QuantReport(spec.name)
    report.dense_linear_weight_bytes, report.lm_head_bytes = weight_bytes(stage)
    tied = _tied_ids(stage)
    choices: dict[tuple[str, int, int], KernelChoice] = {}
    for name, layer in quantizable_layers(stage, spec):
        w, kind = layer.weight, kernel_kind(name, layer, spec)
        qw = quantize(w, spec.kind, spec.group_size, _whole_row_amax(layer, spec))
        key = (kind, *w.shape)
        if key in choices:   # same shape: same kernel(s), built on this layer's own weight
            kernel = build_chosen(kind, choices[key], qw, w.dtype)
        else:
            kernel, choices[key] = choose_kernel(kind, qw, w.dtype, min(batch_size, MAX_TIMED_BATCH))
        layer.matmul = QuantizedMatmul(kernel, kernel.name)   # "a|b": small bucket | large
        report.layers += 1
        if isinstance(layer, LinearBase):
            report.linear_weight_bytes += kernel.nbytes
        else:   # tied: the embedding keeps the dense copy and the head adds its quantized one
            report.lm_head_bytes = kernel.nbytes
        if id(w) in tied:
            report.kept_dense.append(f"{name}: dense weight kept for the tied embedding")
        else:
            layer.weight = None   # the quantized kernel holds the only copy now
    if not spec.quantizes_lm_head:
        report.kept_dense.append("lm_head (weight-only methods leave it dense)")
    report.kept_dense.append("embeddings (a row lookup per token)")
    # "out x in" (w8a8's weight-only layers: "out x in w8a8_wo")
    report.kernels = {f"{o}x{i}" + (f" {k}" if k != spec.kind else ""): c.to_dict() for (k, o, i), c in choices.items()}
    return report
