"""Pick each weight shape's kernel by measurement, once, at load.

For every distinct (out, in) shape of a rank's quantized layers, every candidate kernel of the
method is built on that rank's real weight slice, checked against the method's reference
kernel on activations shaped like a prefill's (`probe_activations`; every token's relative L2
error within `TOLERANCE`), and timed at batch 1 and
at the engine's batch size. The winner minimises the product of its two time ratios to the
dense fp matmul, so it must do well both in decode and in throughput. A winner that still loses
to the dense matmul is kept (the method was asked for) but logged as a warning with its ratio.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from sharding.quant.formats import QuantizedWeight, dequantize
from sharding.quant.kernels import BF16_TOLERANCE, CANDIDATES, REFERENCE, TOLERANCE, W8A8_ERROR_FACTOR

log = logging.getLogger("shardline.quant")


@dataclass
class KernelChoice:
    """What was measured for one weight shape on one rank (ms per call), and what won."""

    shape: tuple[int, int]
    kernel: str
    ms: dict[str, list[float]] = field(default_factory=dict)      # name -> [batch 1, batch B]; "dense" included
    rejected: dict[str, str] = field(default_factory=dict)        # name -> why (error or inexact)
    batch_sizes: tuple[int, int] = (1, 1)

    @property
    def ratio_to_dense(self) -> tuple[float, float]:
        """Winner's time / dense time at batch 1 and batch B (< 1 is faster)."""
        k, d = self.ms[self.kernel], self.ms["dense"]
        return k[0] / d[0], k[1] / d[1]

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio_to_dense": list(self.ratio_to_dense)}


def time_ms(fns: dict[str, object], x: torch.Tensor, budget_s: float = 0.1, rounds: int = 3,
            max_rounds: int = 30) -> dict[str, float]:
    """Fastest milliseconds per call of each fn(x), timed round-robin after one warm-up call each.

    Round-robin and the minimum, not the median: on a shared machine other processes only ever
    add time, and interleaving spreads any slow stretch over every candidate alike.
    """
    best = {}
    for name, fn in fns.items():
        fn(x)
        best[name] = float("inf")
    start, done = time.perf_counter(), 0
    while done < rounds or (time.perf_counter() - start < budget_s and done < max_rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn(x)
            best[name] = min(best[name], time.perf_counter() - t0)
        done += 1
    return {name: 1e3 * t for name, t in best.items()}


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))


def row_relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """The worst token's relative L2 error: a kernel must be exact enough for quiet tokens too."""
    y, ref = y.float(), ref.float()
    return float(((y - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)).max())


def probe_activations(batch: int, features: int) -> torch.Tensor:
    """Activations shaped like a real prefill's: token magnitudes spread over 100x, a few loud channels.

    Gaussian rows of equal size would hide what sinks a per-call activation range (one loud
    token sets the scale for all) and flatter every kernel alike.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, features, generator=gen)
    x[:, torch.randperm(features, generator=gen)[:max(1, features // 64)]] *= 8     # outlier channels
    if batch > 1:
        x *= torch.logspace(-1, 1, batch)[torch.randperm(batch, generator=gen)][:, None]
    return x


@torch.inference_mode()
def choose_kernel(kind: str, qw: QuantizedWeight, dtype: torch.dtype, batch_size: int,
                  candidates: list | None = None) -> tuple[object, KernelChoice]:
    """(the built winning kernel, the measurements) for one weight slice."""
    out, inp = qw.shape
    xs = [probe_activations(b, inp).to(dtype) for b in (1, batch_size)]
    reference = REFERENCE[kind](qw, dtype)
    refs = [reference(x) for x in xs]
    tol = max(TOLERANCE[kind], BF16_TOLERANCE if dtype != torch.float32 else 0.0)
    dense_w = dequantize(qw, dtype)
    if kind == "w8a8":   # rounding activations is the method: allow a multiple of the reference's own error
        refs = [F.linear(x, dense_w) for x in xs]   # ... against the unquantized activations
        own = max(row_relative_error(reference(x), r) for x, r in zip(xs, refs))
        tol = max(tol, W8A8_ERROR_FACTOR * own)
    choice = KernelChoice(shape=(out, inp), kernel="", batch_sizes=(1, batch_size))
    built = {"dense": lambda x, w=dense_w: F.linear(x, w)}
    for cls in candidates or CANDIDATES[kind]:
        try:
            kernel = reference if cls is type(reference) else cls(qw, dtype)
            err = max(row_relative_error(kernel(x), r) for x, r in zip(xs, refs))
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:   # op missing or shape unsupported
            choice.rejected[cls.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        if err > tol:
            choice.rejected[cls.name] = f"relative error {err:.2e} > {tol:.0e}"
            continue
        built[cls.name] = kernel
    per_batch = [time_ms(built, x) for x in xs]
    choice.ms = {name: [t[name] for t in per_batch] for name in built}
    dense = choice.ms["dense"]
    best, best_score = None, float("inf")
    for name, kernel in built.items():
        if name == "dense":
            continue
        score = choice.ms[name][0] / dense[0] * choice.ms[name][1] / dense[1]
        if score < best_score:
            best, best_score, choice.kernel = kernel, score, name
    if best is None:   # cannot happen while the reference is a candidate; say so loudly if it does
        raise RuntimeError(f"no {kind} kernel works for shape {(out, inp)}: {choice.rejected}")
    r1, rb = choice.ratio_to_dense
    msg = (f"{kind} {out}x{inp}: kernel {choice.kernel}, {r1:.2f}x dense time at batch 1, "
           f"{rb:.2f}x at batch {batch_size}")
    if r1 > 1 or rb > 1:
        log.warning("%s - slower than the unquantized matmul", msg)
    else:
        log.info(msg)
    return best, choice
