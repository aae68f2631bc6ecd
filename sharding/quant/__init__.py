"""Weight quantization per rank: methods (`spec`), formats, candidate kernels, measured selection.

    from sharding.quant import quantize_stage
    report = quantize_stage(stage, "int8", batch_size=64)   # after load_stage filled the slices

Each rank quantizes only its own slices; `validate.check_quantization` proves a method fits a
layout (int4 groups inside every rank's input slice) before any worker starts.
"""

from sharding.quant.apply import QuantizedMatmul, QuantReport, quantize_stage
from sharding.quant.spec import METHODS, QuantizationError, QuantSpec, parse_method

__all__ = ["METHODS", "QuantReport", "QuantSpec", "QuantizationError", "QuantizedMatmul", "parse_method",
           "quantize_stage"]
