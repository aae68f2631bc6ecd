"""Pick each weight shape's kernels by measurement, once, at load: one per batch-size bucket.

For every distinct (out, in) shape of a rank's quantized layers, every candidate kernel of the
method is built on that rank's real weight slice, checked against the method's reference
kernel on activations shaped like a prefill's (`probe_activations`; every token's relative L2
error within `TOLERANCE`) for each bucket it could serve, and timed at batch 1 and at the
engine's batch size. Two buckets, dispatched on the call's row count (`BucketedKernel`):

    small   rows <= SMALL_ROWS (decode of a few sequences): the fastest exact kernel at batch 1
    large   everything else (prefill, wide decode batches): the fastest at the engine's batch

A second kernel costs a second copy of the weight, so the small bucket gets its own kernel
only when it beats the large bucket's kernel at batch 1 by `SECOND_KERNEL_GAIN`, and only in
the speed-first method: the memory-first ones (`MEMORY_FIRST`: int8, int4) keep one kernel,
the one with the smallest product of its two time ratios to the dense matmul. A winner
that still loses to the dense fp matmul is kept (the method was asked for) but logged as a
warning with its ratio.
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


# methods that keep one kernel (one copy of the weight) per shape
MEMORY_FIRST = {"int8", "int4"}
# rows up to which a call counts as decode-sized: fbgemm_fp16 beats fbgemm_outliers up to ~8
# rows on SmolLM2's decoder shapes here and ties it from ~16 (benchmarks/NOTES.md section 6b)
SMALL_ROWS = 8
# the small bucket's own kernel must be at least this much faster at batch 1 than the large
# bucket's, or the large one serves both (a second kernel holds a second copy of the weight)
SECOND_KERNEL_GAIN = 1.15
# kernels within this factor of a bucket's fastest count as equally fast: the more exact one
# wins. w8a8's perplexity on SmolLM2 moves by ~0.3 points when a 1e-7 change in one layer's
# input flips some activation roundings (benchmarks/NOTES.md section 6c), so a speed tie on a
# loaded machine should not decide between activation rounding and none
SPEED_TIE = 1.10


class BucketedKernel:
    """Two kernels for one weight, picked per call by its row count (no per-sequence Python)."""

    def __init__(self, small, large, small_rows: int = SMALL_ROWS):
        self.small, self.large, self.small_rows = small, large, small_rows
        self.name = f"{small.name}|{large.name}"
        self.nbytes = small.nbytes + large.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, in]
        return (self.small if x.shape[0] <= self.small_rows else self.large)(x)


@dataclass
class KernelChoice:
    """What was measured for one weight shape on one rank (ms per call), and what won per bucket."""

    shape: tuple[int, int]
    small: str = ""                     # kernel for calls of <= small_rows rows
    large: str = ""                     # kernel for wider calls
    small_rows: int = SMALL_ROWS
    ms: dict[str, list[float]] = field(default_factory=dict)          # name -> [batch 1, batch B]; "dense" too
    rejected: dict[str, str] = field(default_factory=dict)            # name -> why (error or inexact, per bucket)
    error: dict[str, float] = field(default_factory=dict)             # name -> worst token's relative error
    batch_sizes: tuple[int, int] = (1, 1)

    @property
    def kernel(self) -> str:
        """One name for logs and tables: "a" or "a (<= 8 rows) + b"."""
        return self.large if self.small == self.large else f"{self.small} (<= {self.small_rows} rows) + {self.large}"

    @property
    def ratio_to_dense(self) -> tuple[float, float]:
        """Each bucket's kernel time / dense time, at batch 1 and at batch B (< 1 is faster)."""
        d = self.ms["dense"]
        return self.ms[self.small][0] / d[0], self.ms[self.large][1] / d[1]

    def to_dict(self) -> dict:
        return {**asdict(self), "kernel": self.kernel, "ratio_to_dense": list(self.ratio_to_dense)}


def _fastest(names: list[str], choice: KernelChoice, at: int) -> str:
    """The fastest of `names` at batch index `at`; among those within SPEED_TIE of it, the most exact."""
    best = min(choice.ms[n][at] for n in names)
    return min((n for n in names if choice.ms[n][at] <= SPEED_TIE * best), key=lambda n: choice.error[n])


def build_chosen(kind: str, choice: KernelChoice, qw: QuantizedWeight, dtype: torch.dtype):
    """The chosen kernel(s) of `choice` built on another weight of the same shape."""
    classes = {c.name: c for c in CANDIDATES[kind]}
    large = classes[choice.large](qw, dtype)
    if choice.small == choice.large:
        return large
    return BucketedKernel(classes[choice.small](qw, dtype), large, choice.small_rows)


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
    """(the built kernel - a `BucketedKernel` when the buckets differ - and the measurements)."""
    out, inp = qw.shape
    small_rows = min(SMALL_ROWS, batch_size)
    # exactness probes per bucket: the small one at 1 and at its widest call, the large one at B
    probes = {"small": [probe_activations(b, inp).to(dtype) for b in sorted({1, small_rows})],
              "large": [probe_activations(batch_size, inp).to(dtype)]}
    reference = REFERENCE[kind](qw, dtype)
    tol = max(TOLERANCE[kind], BF16_TOLERANCE if dtype != torch.float32 else 0.0)
    dense_w = dequantize(qw, dtype)
    xs = {x.shape[0]: x for bucket in probes.values() for x in bucket}   # batch -> probe
    if kind == "w8a8":   # rounding activations is the method: allow a multiple of the reference's own error
        refs = {b: F.linear(x, dense_w) for b, x in xs.items()}   # ... against the unquantized activations
        tol = max(tol, W8A8_ERROR_FACTOR * max(row_relative_error(reference(x), refs[b]) for b, x in xs.items()))
    else:
        refs = {b: reference(x) for b, x in xs.items()}
    choice = KernelChoice(shape=(out, inp), small_rows=small_rows, batch_sizes=(1, batch_size))
    built = {"dense": lambda x, w=dense_w: F.linear(x, w)}
    serves: dict[str, set[str]] = {}   # name -> buckets it is exact enough for
    for cls in candidates or CANDIDATES[kind]:
        try:
            kernel = reference if cls is type(reference) else cls(qw, dtype)
            errs = {b: row_relative_error(kernel(x), refs[b]) for b, x in xs.items()}
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:   # op missing or shape unsupported
            choice.rejected[cls.name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        ok = {bucket for bucket, bx in probes.items() if all(errs[x.shape[0]] <= tol for x in bx)}
        if not ok:
            choice.rejected[cls.name] = f"relative error {max(errs.values()):.2e} > {tol:.0e}"
            continue
        if ok != set(probes):
            worst = max(errs[x.shape[0]] for bucket in set(probes) - ok for x in probes[bucket])
            missing = "/".join(sorted(set(probes) - ok))
            choice.rejected[cls.name] = f"not for the {missing} bucket: relative error {worst:.2e} > {tol:.0e}"
        built[cls.name], serves[cls.name], choice.error[cls.name] = kernel, ok, max(errs.values())
    timed = [time_ms(built, xs[b]) for b in (1, batch_size)]
    choice.ms = {name: [t[name] for t in timed] for name in built}
    if not any(len(ok) == 2 for ok in serves.values()):
        # cannot happen while the reference is a candidate; say so loudly if it does
        raise RuntimeError(f"no {kind} kernel works for shape {(out, inp)}: {choice.rejected}")
    dense = choice.ms["dense"]
    if kind in MEMORY_FIRST:   # one kernel, one copy: the best product of the two time ratios to dense
        both = [n for n, ok in serves.items() if len(ok) == 2]
        choice.small = choice.large = min(both, key=lambda n: choice.ms[n][0] / dense[0] * choice.ms[n][1] / dense[1])
    else:
        choice.large = _fastest([n for n, ok in serves.items() if "large" in ok], choice, 1)
        choice.small = _fastest([n for n, ok in serves.items() if "small" in ok], choice, 0)
        small_ms, large_ms = choice.ms[choice.small][0], choice.ms[choice.large][0]   # both at batch 1
        if "small" in serves[choice.large] and small_ms * SECOND_KERNEL_GAIN > large_ms:
            choice.small = choice.large   # not worth a second copy of the weight
    kernel = built[choice.large] if choice.small == choice.large else BucketedKernel(
        built[choice.small], built[choice.large], small_rows)
    r1, rb = choice.ratio_to_dense
    msg = (f"{kind} {out}x{inp}: kernel {choice.kernel}, {r1:.2f}x dense time at batch 1, "
           f"{rb:.2f}x at batch {batch_size}")
    if r1 > 1 or rb > 1:
        log.warning("%s - slower than the unquantized matmul", msg)
    else:
        log.info(msg)
    return kernel, choice
