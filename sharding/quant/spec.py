"""Quantization methods by name, without torch: what `quantization=` accepts and what it means.

    int8        weight-only, symmetric int8, one fp32 scale per output channel (memory first)
    int4        weight-only, asymmetric 4-bit in groups of 32 input features along each row,
                one fp16 scale and low per group, two values per byte: 5 bits per weight,
                6.4x smaller than fp32 (memory first)
    int4-g32, int4-g64, int4-g128   the same with another group size (4.5 / 4.25 bits per weight)

The int4 default is group 32: the only size meeting both targets on the bundled SmolLM2 (>= 6x
smaller, perplexity within 5 % of fp32). Group 64 is 7.1x smaller but +18 % perplexity even with
the clipping search; the bundled weights come from a Q4_1 GGUF (blocks of 32), so group 32
reproduces them exactly while a group of 64 spans two blocks' grids (README: Precision).
    w8a8        int8 weights as `int8`, activations quantized to int8 per token at run time, except
                the 8 input channels loudest in each call, which stay dense, and the MLP output
                projection, which is int8 weight-only (speed first)

Group-wise scales run along the input dimension, so with tensor parallelism a row-parallel
layer's input slice (e.g. `o_proj`, `down_proj`) must be a multiple of the group size; the
check that says so runs before any worker starts (`sharding.quant.validate`).

Embeddings always stay in the model dtype (a lookup reads one row per token: nothing to
speed up, and quantizing them would cost accuracy for no gain in speed). The LM head is
quantized only by `w8a8`: with tied embeddings (SmolLM2, GPT-2) the embedding keeps its
full-precision copy, so a weight-only LM head would add memory instead of saving it.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.config import SUPPORTED_QUANTIZATION as METHODS

INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP_SIZE = 32


class QuantizationError(ValueError):
    """A quantization setting cannot work for this model or layout; the message says what to change."""


@dataclass(frozen=True, slots=True)
class QuantSpec:
    """A parsed method name."""

    name: str              # as given, e.g. "int4-g32"
    kind: str              # "int8", "int4" or "w8a8"
    group_size: int = 0    # int4 only: input features per scale

    @property
    def quantizes_lm_head(self) -> bool:
        return self.kind == "w8a8"


def parse_method(name: str) -> QuantSpec:
    """`QuantSpec` for a method name; a clear error for anything else."""
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(str(name), METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise QuantizationError(f"quantization={name!r} is not a known method{hint}; choose one of "
                                f"{', '.join(METHODS)} or None")
    if name.startswith("int4"):
        group = int(name.split("-g")[1]) if "-g" in name else DEFAULT_INT4_GROUP_SIZE
        return QuantSpec(name, "int4", group)
    return QuantSpec(name, name)


def largest_group_size(in_sizes: list[int]) -> int | None:
    """The largest supported int4 group size dividing every input size, or None."""
    fits = [g for g in INT4_GROUP_SIZES if all(n % g == 0 for n in in_sizes)]
    return max(fits) if fits else None
