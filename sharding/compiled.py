"""`compile=True`: decode steps through `torch.compile` (inductor), padded to a few fixed batch sizes.

A decode step's shapes depend on two numbers: the batch (one token per sequence) and the
longest context. Only the batch enters a compiled graph:

- paged attention runs eagerly (`PagedAttention.forward` is `torch.compiler.disable`d): the
  context grows every step, and a graph per context length would recompile every 16 tokens;
- the batch is padded up to the next bucket (`decode_buckets`: 1, 2, 4, ... max_num_seqs), so
  a handful of graphs cover every batch. Padding rows are dummy sequences of one token whose
  K/V go to a scratch block the block manager never hands out (`ModelRunner`), so they touch
  no real sequence's cache and their outputs are dropped;
- TP all-reduces run eagerly too (graph breaks, `RowParallelLinear.forward`), and PP
  send/recv sit outside the model's forward, so no collective is ever traced.

What is compiled is everything between those breaks: norms, projections, rotary, activations
and residuals of every layer. Each graph is compiled the first time its bucket is used (a few
seconds per bucket on CPU). Prefill and mixed steps stay eager.

On CPU inductor writes C++ and builds it with the system compiler (g++ or $CXX):
`check_compiler` fails at load, with what to install, when there is none.
"""

from __future__ import annotations

import bisect

import torch


class CompilerMissingError(RuntimeError):
    """compile=True on a CPU machine with no C++ compiler for inductor."""


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """Padded decode batch sizes: powers of two below max_num_seqs, then max_num_seqs itself.

    >>> decode_buckets(1), decode_buckets(8), decode_buckets(100)
    ((1,), (1, 2, 4, 8), (1, 2, 4, 8, 16, 32, 64, 100))
    """
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return (*sizes, max_num_seqs)


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int | None:
    """The smallest bucket holding `batch` sequences; None if none does."""
    i = bisect.bisect_left(buckets, batch)
    return buckets[i] if i < len(buckets) else None


def check_compiler(device: torch.device) -> None:
    """Raise CompilerMissingError unless inductor can build CPU kernels here (GPUs use Triton)."""
    if device.type != "cpu":
        return
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        tried = [c for c in inductor_config.cpp.cxx if c]
        raise CompilerMissingError(
            f"compile=True needs a C++ compiler for torch.compile's CPU backend (inductor) and found none "
            f"(tried {', '.join(tried) or 'none'}; set $CXX to one): install g++ (e.g. `apt-get install g++`) "
            "or run with compile=False") from None


class CompiledDecode:
    """The stage's forward compiled once per decode bucket; callers pad the batch (`bucket_for`)."""

    def __init__(self, model: torch.nn.Module, max_num_seqs: int, device: torch.device):
        check_compiler(device)
        self.buckets = decode_buckets(max_num_seqs)
        # one graph per bucket for each compiled frame: dynamo's default limit (8) would silently
        # run the larger buckets eagerly
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(self.buckets) + 1)
        # dynamic=False: every bucket is its own static-shape graph (no symbolic sizes to guard)
        self.forward = torch.compile(model.forward, dynamic=False)

    def bucket(self, batch: int) -> int | None:
        return bucket_for(batch, self.buckets)
