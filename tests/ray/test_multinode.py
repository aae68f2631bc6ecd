"""Simulated multi-node placement with `ray.cluster_utils.Cluster` (several raylets on this machine).

The cluster: a head with 0 CPUs (it hosts only the driver) and two worker nodes with 1 CPU each.
With the default share (2 CPUs / 4 workers = 0.5), a tp=2 x pp=2 layout fits only one way:
each stage's TP group fills one node, so the stages must land on different nodes.
"""

from __future__ import annotations

import pytest
import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from cluster.llm import LLM
from cluster.placement import ResourceError
from cluster.ray_executor import PlacementTimeoutError
from tests.ray.common import mixed_prompts, run_and_compare
from tests.ray.conftest import simulated_cluster

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]



@pytest.fixture(scope="module")
def two_node_cluster(ray_tmpdir):
    with simulated_cluster({"a": {"num_cpus": 1}, "b": {"num_cpus": 1}}) as (cluster, nodes):
        yield cluster, {n.node_id for n in nodes.values()}


def test_tp_group_on_one_node_stages_on_different_nodes(tiny_llama_dir, two_node_cluster):
    cluster, worker_node_ids = two_node_cluster
    info = run_and_compare(tiny_llama_dir, 2, 2, 1, cluster.address, mixed_prompts(vocab=509), [6, 9, 4, 8])
    nodes = info["node_ids"]                                   # (replica, pp, tp) -> node id
    stage0 = {nodes[(0, 0, 0)], nodes[(0, 0, 1)]}
    stage1 = {nodes[(0, 1, 0)], nodes[(0, 1, 1)]}
    assert len(stage0) == 1 and len(stage1) == 1, f"a TP group was split across nodes: {nodes}"
    assert stage0 != stage1, f"both stages on one node: {nodes}"
    assert stage0 | stage1 == worker_node_ids                   # nothing on the 0-CPU head


def test_tp_group_larger_than_any_node_fails_before_actors(tiny_llama_dir, two_node_cluster):
    cluster, _ = two_node_cluster
    with pytest.raises(ResourceError, match="tensor-parallel group must share one node"):
        LLM(str(tiny_llama_dir), tensor_parallel_size=2, address=cluster.address, cpus_per_worker=0.75,
            resource_wait_s=0)


def test_placement_that_cannot_be_met_times_out_clearly(tiny_llama_dir, two_node_cluster):
    """1 CPU is free in total but split 0.5 + 0.5 across nodes: a 2 x 0.5 TP group cannot be packed."""
    cluster, _ = two_node_cluster
    blocker = placement_group([{"CPU": 0.5}, {"CPU": 0.5}], strategy="STRICT_SPREAD")
    ray.get(blocker.ready(), timeout=30)
    try:
        with pytest.raises(PlacementTimeoutError, match=r"could not reserve the placement group of \(replica 0, "
                                                        r"stage 0\) within 3 s"):
            LLM(str(tiny_llama_dir), tensor_parallel_size=2, address=cluster.address, cpus_per_worker=0.5,
                placement_timeout_s=3)
    finally:
        remove_placement_group(blocker)
    ours = [g for g in placement_group_table().values()
            if g["name"].startswith("shardline-") and g["state"] != "REMOVED"]
    assert ours == []
