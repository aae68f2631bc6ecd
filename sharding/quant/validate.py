"""Prove a quantization method fits a model and layout before any worker starts.

Every rank's stage is built on the meta device (no weights, no memory, no process group), so
the sizes checked are exactly the ones the workers will quantize, whatever partition the
`ShardPlan` chose for each rank.
"""

from __future__ import annotations

import torch

from scheduler.config import EngineConfig
from sharding.dist import ParallelGroups
from sharding.models import stage_class
from sharding.plan import ShardPlan, load_hf_config
from sharding.quant.apply import check_group_size
from sharding.quant.folder import folder_method
from sharding.quant.spec import QuantizationError, parse_method


def check_quantization(config: EngineConfig) -> None:
    """Raise QuantizationError naming what to change if `config.quantization` cannot run."""
    stored = folder_method(config.model)
    if stored is not None and stored != config.quantization:
        raise QuantizationError(f"{config.model} was written by `shardline quantize --method {stored}`; "
                                f"load it with quantization={stored!r} (got {config.quantization!r})")
    spec = parse_method(config.quantization)
    hf_config = load_hf_config(config.model)
    plan = ShardPlan.build(hf_config, config.tensor_parallel_size, config.pipeline_parallel_size,
                           config.layer_split)
    if spec.kind != "int4":
        return
    for rank in range(config.world_size):
        groups = ParallelGroups(rank=rank, tp_size=config.tensor_parallel_size,
                                pp_size=config.pipeline_parallel_size, device=torch.device("meta"), backend="none")
        with torch.device("meta"):
            stage = stage_class(plan.dims.model_type)(hf_config, plan, groups)
        check_group_size(stage, spec, f"rank {rank} (pp_rank={groups.pp_rank}, tp_rank={groups.tp_rank}, "
                                      f"tensor_parallel_size={config.tensor_parallel_size})")
