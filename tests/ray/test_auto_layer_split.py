"""`layer_split="auto"` on a simulated two-node cluster with unequal memory.

`ray.cluster_utils.Cluster` runs a 0-CPU head (the driver only) and two 1-CPU worker nodes on
this machine; each node's free memory is simulated with Ray's `memory` resource (what
`ray start --memory` declares, and what `cluster.layer_split` reads): 3 GiB and 1 GiB. With one
CPU per worker, each pipeline stage fills one node, so Ray decides which stage gets the big
node and the split must follow: the tiny Llama (4 layers of ~160 KB, 130 KB embedding and
head) splits 3 + 1 whichever way round. Outputs stay identical to `transformers`.
"""

from __future__ import annotations

import pytest

from tests.ray.common import assert_matches_hf, generate_greedy, mixed_prompts
from tests.ray.conftest import simulated_cluster

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

GIB = 2**30
NODE_MEMORY = {"big": 3 * GIB, "small": 1 * GIB}


@pytest.fixture(scope="module")
def unequal_cluster(ray_tmpdir):
    with simulated_cluster({name: {"num_cpus": 1, "memory": mem} for name, mem in NODE_MEMORY.items()}) as (
            cluster, nodes):
        yield cluster, {name: n.node_id for name, n in nodes.items()}


def test_auto_split_gives_the_larger_node_more_layers_and_outputs_stay_exact(tiny_llama_dir, unequal_cluster):
    from cluster.llm import LLM

    cluster, node_ids = unequal_cluster
    prompts, max_tokens = mixed_prompts(vocab=509), [6, 9, 4, 8]
    with LLM(str(tiny_llama_dir), pipeline_parallel_size=2, address=cluster.address) as llm:
        assert llm.config.layer_split == "auto"          # the default
        counts = llm.executor.plan.layer_counts
        stage_node = {pp: node for (_, pp, _), node in llm.executor.node_ids.items()}
        got = generate_greedy(llm, prompts, max_tokens)
    big_stage = next(pp for pp, node in stage_node.items() if node == node_ids["big"])
    small_stage = 1 - big_stage
    print(f"stage on the 3 GiB node: {big_stage}; layers per stage {counts}")
    assert stage_node[small_stage] == node_ids["small"]
    assert counts[big_stage] == 3 and counts[small_stage] == 1, counts
    assert_matches_hf(tiny_llama_dir, prompts, max_tokens, got)
