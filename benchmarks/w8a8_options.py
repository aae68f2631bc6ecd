"""Perplexity of w8a8's design options: which layers round their activations, and how.

The README's "w8a8 options" figures. Each option swaps the linear layers of HF's own
SmolLM2 (`transformers`, fp32) for Shardline's quantized kernels (`sharding.quant.kernels`,
built on the same int8 weights Shardline quantizes at load) and computes the perplexity of
the precision benchmark's text (benchmarks/data/pride_and_prejudice_ch1.txt) in one forward
pass: a prefill, so each option's wide-call (large bucket) kernel is what is measured. No
timing: speed is `bench_precision.py`'s. ~1 min on 2 cores.

    python benchmarks/w8a8_options.py                 # every option, a markdown table
    python benchmarks/w8a8_options.py --only "per-token everywhere"
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# isort: off
from benchmarks import common  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads)
# isort: on

TEXT = pathlib.Path(__file__).resolve().parent / "data" / "pride_and_prejudice_ch1.txt"
LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# option -> (kernel for the decoder's linears, kernel for down_proj, kernel for the LM head,
#            outlier channels); kernel names as in sharding.quant.kernels, None = left in fp32
OPTIONS = {
    "fp32": (None, None, None, 0),
    "per-token everywhere": ("fbgemm_per_token", "fbgemm_per_token", "fbgemm_per_token", 0),
    "per-token, down_proj weight-only": ("fbgemm_per_token", "dequant", "fbgemm_per_token", 0),
    "per-token, down_proj weight-only, LM head fp32": ("fbgemm_per_token", "dequant", None, 0),
    "8 outlier channels everywhere": ("fbgemm_outliers", "fbgemm_outliers", "fbgemm_outliers", 8),
    "16 outlier channels everywhere": ("fbgemm_outliers", "fbgemm_outliers", "fbgemm_outliers", 16),
    "8 outlier channels, down_proj weight-only (w8a8 before)": ("fbgemm_outliers", "dequant", "fbgemm_outliers", 8),
    "decoder fp16 copies of the int8 weights, LM head 8 outlier channels (picked here)":
        ("fbgemm_fp16", "fbgemm_fp16", "fbgemm_outliers", 8),
}


def kernel_classes() -> dict:
    from sharding.quant import kernels

    return {c.name: c for c in (kernels.FbgemmPerToken, kernels.FbgemmOutliers, kernels.FbgemmFp16,
                                kernels.DequantMatmul)}


class KernelLinear:
    """Stands in for an `nn.Linear` (no bias in SmolLM2): x [..., in] -> kernel -> [..., out].

    rows: tokens per kernel call. The outlier kernels pick their channels per call, so the LM
    head is called as Shardline's prompt logprobs call it (`ROWS_PER_CALL` rows at a time).
    """

    def __init__(self, kernel, rows: int | None = None):
        self.kernel, self.rows = kernel, rows

    def __call__(self, x):
        import torch

        flat = x.reshape(-1, x.shape[-1])
        step = self.rows or len(flat)
        y = torch.cat([self.kernel(flat[i:i + step]) for i in range(0, len(flat), step)])
        return y.reshape(*x.shape[:-1], y.shape[-1])


def swap_linears(model, option: tuple) -> None:
    """Replace every decoder linear and the LM head of an HF Llama by its option's kernel."""
    import torch

    from sharding.prompt_logprobs import ROWS_PER_CALL
    from sharding.quant.formats import quantize

    classes = kernel_classes()
    body, down, head, channels = option

    def make(linear, name, rows=None):
        kernel = classes[name](quantize(linear.weight.data, "w8a8"), torch.float32)
        if hasattr(kernel, "k"):
            kernel.k = min(channels, linear.weight.shape[1])
        return KernelLinear(kernel, rows)

    for layer in model.model.layers:
        for group in (layer.self_attn, layer.mlp):
            for name in LAYERS:
                linear = getattr(group, name, None)
                kind = down if name == "down_proj" else body
                if linear is not None and kind is not None:
                    linear.forward = make(linear, kind)
    if head is not None:
        model.lm_head.forward = make(model.lm_head, head, ROWS_PER_CALL)


def perplexity(model_dir: str, option: tuple) -> float:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ids = Tokenizer.from_file(str(pathlib.Path(model_dir) / "tokenizer.json")).encode(TEXT.read_text()).ids
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        swap_linears(model, option)
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
        nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).mean()
    return math.exp(float(nll))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--only", nargs="+", choices=list(OPTIONS), default=list(OPTIONS))
    args = ap.parse_args()
    common.set_threads(2)
    model = common.model_path(args.model)
    names = ["fp32"] + [n for n in args.only if n != "fp32"]
    ppl = {name: perplexity(model, OPTIONS[name]) for name in names}
    rows = [[name, f"{p:.3f}", f"{100 * (p / ppl['fp32'] - 1):+.2f} %"] for name, p in ppl.items()]
    print(common.markdown_table(["w8a8 option (HF SmolLM2, linears swapped)", "perplexity", "vs fp32"], rows))


if __name__ == "__main__":
    main()
