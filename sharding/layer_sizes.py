"""Byte sizes of a model's decoder layers, embeddings and LM head, measured without any weights.

The Hugging Face model is built on the meta device (`accelerate.init_empty_weights`) and
`accelerate.utils.compute_module_sizes` adds up each module's tensors at the serving dtype, so
the sizes are the model's real ones (biases, norms, tied heads) rather than a formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sharding.loader import DTYPES


@dataclass(frozen=True, slots=True)
class StageBytes:
    layers: list[int]
    """Bytes of each decoder layer, in order."""
    first_extra: int
    """Bytes only the first stage holds (token and position embeddings)."""
    last_extra: int
    """Bytes only the last stage holds (LM head, also when tied: it is its own copy there)."""


def model_byte_sizes(hf_config, dtype: str = "float32") -> StageBytes:
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(hf_config)
    sizes = compute_module_sizes(model, dtype=DTYPES[dtype])
    layers = _decoder_layers(model)
    names = {id(m): name for name, m in model.named_modules()}
    layer_bytes = [sizes[names[id(layer)]] for layer in layers]
    first = sizes[names[id(model.get_input_embeddings())]]
    if getattr(hf_config, "model_type", None) == "gpt2":
        first += sizes["transformer.wpe"]
    head = model.get_output_embeddings().weight
    last = head.numel() * torch.empty(0, dtype=DTYPES[dtype]).element_size()
    return StageBytes(layers=layer_bytes, first_extra=int(first), last_extra=int(last))


def _decoder_layers(model) -> list:
    body = getattr(model, "model", None) or model.transformer
    return list(getattr(body, "layers", None) or body.h)
