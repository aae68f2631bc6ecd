"""The memory layout of each dense weight, chosen by measurement once at load.

A dense weight is always the logical [out, in] matrix that `F.linear` (inside `DenseMatmul`)
takes; only its storage differs:

- "out_in": row-major [out, in], as in the checkpoint;
- "in_out": the transpose of a contiguous [in, out] matrix (strides (1, out)), so the operand
  `F.linear` hands to BLAS (`W.t()`) is contiguous and the GEMM runs non-transposed.

Which one is faster depends on the BLAS, the CPU, the shape and the batch: measured with MKL on
an AVX2 EPYC, "in_out" reads the LM head (49152 x 576) at batch 1 in about half the time, but is
slower at batches 8-64 on wide matrices (benchmarks/NOTES.md). So every distinct shape of a rank's
dense layers is timed both ways, at batch 1 and at the engine's batch size, on weights too big
for the caches (a decode step reads its weights cold), and a shape switches to "in_out" only if
it is no slower at the engine's batch size and the product of its two time ratios beats "out_in"
by a margin. One copy is kept either way,
and `DenseMatmul` stays the seam: layers a quantization method took over are skipped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sharding.layers.linear import DenseMatmul

log = logging.getLogger("shardline.layout")

COLD_BYTES = 64 * 2**20     # more than the last-level cache: each timed call reads its weight from memory
SWITCH_MARGIN = 0.9         # "in_out" must be at least 10 % faster (product of ratios) to be worth a copy
MAX_TIMED_BATCH = 64
MIN_TIMED_BYTES = 512 * 2**10   # smaller weights stay as loaded: per-call overhead dominates, layout is noise
MAX_COPIES = 64
LAYOUTS = ("out_in", "in_out")


@dataclass
class LayoutChoice:
    """What was measured for one weight shape (ms per call at batch 1 and batch B) and what won."""

    shape: tuple[int, int]
    layout: str
    ms: dict[str, list[float]] = field(default_factory=dict)
    batch_sizes: tuple[int, int] = (1, 1)


def store(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """The same [out, in] values in the given storage layout."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
    return weight.contiguous() if layout == "out_in" else weight.t().contiguous().t()


def layout_of(weight: torch.Tensor) -> str:
    return "out_in" if weight.is_contiguous() else "in_out"


def dense_layers(stage: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose matmul is still the dense one (quantized ones hold their own layout)."""
    return [(name, m) for name, m in stage.named_modules()
            if isinstance(getattr(m, "matmul", None), DenseMatmul) and type(m.matmul) is DenseMatmul
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2]


def _time_cold(shape: tuple[int, int], dtype: torch.dtype, device: torch.device, batches: tuple[int, int],
               rounds: int = 3, budget_s: float = 0.2) -> dict[str, list[float]]:
    """Fastest ms per call of F.linear in each layout, cycling over enough copies to defeat the caches."""
    out, inp = shape
    itemsize = torch.empty(0, dtype=dtype).element_size()
    copies = min(MAX_COPIES, max(1, math.ceil(COLD_BYTES / (out * inp * itemsize))))
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(out, inp, generator=gen).to(dtype=dtype, device=device)
    weights = {lay: [store(base, lay).clone(memory_format=torch.preserve_format) for _ in range(copies)]
               for lay in LAYOUTS}
    del base
    best = {lay: [math.inf, math.inf] for lay in LAYOUTS}
    xs = [torch.randn(b, inp, generator=gen).to(dtype=dtype, device=device) for b in batches]
    start, done = time.perf_counter(), 0
    while done < rounds and (done < 1 or time.perf_counter() - start < budget_s):
        for i, x in enumerate(xs):
            for lay in LAYOUTS:   # interleaved: load from other processes hits both alike
                ws = weights[lay]
                t0 = time.perf_counter()
                for w in ws:
                    F.linear(x, w)
                best[lay][i] = min(best[lay][i], (time.perf_counter() - t0) / len(ws))
        done += 1
    return {lay: [1e3 * t for t in ts] for lay, ts in best.items()}


def decide(ms: dict[str, list[float]]) -> str:
    """"in_out" when it is no slower at batch B and its two time ratios multiply to below the margin.

    Throughput first: the LM head reads ~2x faster "in_out" at batch 1 here but 1.2-2x slower at
    batches 8-64, and one copy cannot serve both, so it stays "out_in" (benchmarks/NOTES.md).
    """
    a, b = ms["in_out"], ms["out_in"]
    return "in_out" if a[1] <= b[1] and (a[0] / b[0]) * (a[1] / b[1]) < SWITCH_MARGIN else "out_in"


@torch.inference_mode()
def choose_layouts(stage: nn.Module, batch_size: int) -> dict[str, dict]:
    """Time every distinct dense weight shape both ways and store each weight in the winner.

    Returns "OUTxIN" -> {layout, ms, batch_sizes} for the load report.
    """
    batches = (1, max(1, min(batch_size, MAX_TIMED_BATCH)))
    choices: dict[tuple[int, int], LayoutChoice] = {}
    seen: set[int] = set()
    for _, layer in dense_layers(stage):
        w = layer.weight
        if id(w) in seen:     # a tied weight shared by two modules is moved once
            continue
        seen.add(id(w))
        shape = tuple(w.shape)
        if w.numel() * w.element_size() < MIN_TIMED_BYTES:
            continue
        if shape not in choices:
            ms = _time_cold(shape, w.dtype, w.device, batches)
            choices[shape] = LayoutChoice(shape, decide(ms), ms, batches)
            log.debug("layout %s for %s: %s", choices[shape].layout, shape, ms)
        w.data = store(w.data, choices[shape].layout)
    return {f"{o}x{i}": {"layout": c.layout, "ms": c.ms, "batch_sizes": list(c.batch_sizes)}
            for (o, i), c in choices.items()}
