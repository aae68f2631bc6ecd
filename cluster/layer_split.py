"""`layer_split="auto"`: size each pipeline stage for the node its placement group landed on.

Called by the Ray executor after the placement groups are reserved and before any worker
starts. A stage's memory is the Ray `memory` resource of its node (what Ray measured as free
when the node joined, or what `ray start --memory` declared), shared by every group on that
node. When all stages share one node the split stays the even one; otherwise the layers' real
byte sizes (`sharding.layer_sizes`) are cut so the largest fraction of any stage's memory used
is as small as possible (`cluster.placement.split_layers_by_memory`): the larger node gets
more layers.
"""

from __future__ import annotations

import dataclasses
import logging

import ray
from ray.util.placement_group import PlacementGroup, placement_group_table

from cluster.placement import split_layers_by_memory, stage_memory
from scheduler.config import EngineConfig

logger = logging.getLogger(__name__)


def resolve_layer_split(config: EngineConfig, groups: dict[tuple[int, int], PlacementGroup]) -> EngineConfig:
    """`config` with `layer_split="auto"` replaced by counts chosen for where `groups` landed."""
    if config.layer_split != "auto":
        return config
    if config.pipeline_parallel_size == 1 or not groups:   # no groups of ours: one existing (Serve) group
        return dataclasses.replace(config, layer_split=None)
    table = placement_group_table()
    stage_nodes = {key: table[g.id.hex()]["bundles_to_node_id"][0] for key, g in groups.items()}
    node_memory = {n["NodeID"]: float(n["Resources"].get("memory", 0.0)) for n in ray.nodes() if n.get("Alive")}
    memory = stage_memory(stage_nodes, node_memory, config.pipeline_parallel_size)
    if memory is None or min(memory) <= 0:
        return dataclasses.replace(config, layer_split=None)
    from sharding.layer_sizes import model_byte_sizes
    from sharding.plan import load_hf_config

    sizes = model_byte_sizes(load_hf_config(config.model), config.dtype)
    split = split_layers_by_memory(sizes.layers, memory, sizes.first_extra, sizes.last_extra)
    logger.info("layer_split='auto': stage memory %s GiB -> layers per stage %s",
                [round(m / 2**30, 2) for m in memory], list(split))
    return dataclasses.replace(config, layer_split=split)


def plan_for(config: EngineConfig):
    """The `ShardPlan` of a config whose layer split is resolved."""
    from sharding.plan import check_layout

    return check_layout(config.model, config.tensor_parallel_size, config.pipeline_parallel_size,
                        config.layer_split)
