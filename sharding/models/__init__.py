"""Model families, each able to build one pipeline stage from a `ShardPlan`."""

from __future__ import annotations

from sharding.models.gpt2 import GPT2Stage
from sharding.models.llama import LlamaStage
from sharding.plan import SUPPORTED_MODEL_TYPES, UnsupportedModelError

FAMILIES = {"llama": LlamaStage, "gpt2": GPT2Stage}


def stage_class(model_type: str):
    family = SUPPORTED_MODEL_TYPES.get(model_type)
    if family is None:
        raise UnsupportedModelError(f"model_type={model_type!r} is not supported; supported model types: "
                                    f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    return FAMILIES[family]
