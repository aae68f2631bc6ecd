"""Pre-flight on a simulated multi-node cluster (`ray.cluster_utils.Cluster`: several raylets here).

The head has 0 CPUs; node A (1 CPU) is always there, and each test adds a second 1-CPU node, so a
PP=2 layout with 1 CPU per worker must put one stage on A and one on the added node. A broken
node is simulated honestly per node: its raylet (and so every worker it starts) runs with
SHARDLINE_PREFLIGHT_SIMULATE in its environment, the hook `cluster.preflight` documents.

Also here, because Ray's CLI cannot join a second node to a loopback head on one machine (see
tests/e2e/test_cluster_ops.py): an engine placed across both nodes.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import pytest

from cluster import SamplingParams
from cluster.llm import LLM
from cluster.preflight import PreflightError, run_preflight
from cluster.preflight_probe import SIMULATE_ENV, local_versions
from tests.ray.conftest import simulated_cluster

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

NODE_ARGS = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
TIMEOUT_S = 45.0


@pytest.fixture(scope="module")
def cluster_a(ray_tmpdir):
    with simulated_cluster({"a": NODE_ARGS}) as (cluster, nodes):
        yield cluster, nodes["a"]


@contextmanager
def second_node(cluster, simulate: dict | None = None):
    """A 1-CPU node whose Ray processes see SHARDLINE_PREFLIGHT_SIMULATE=simulate; removed afterwards."""
    saved = os.environ.get(SIMULATE_ENV)
    if simulate is not None:
        os.environ[SIMULATE_ENV] = json.dumps(simulate)
    try:
        node = cluster.add_node(**NODE_ARGS)   # its raylet copies this process's environment now
    finally:
        if saved is None:
            os.environ.pop(SIMULATE_ENV, None)
        else:
            os.environ[SIMULATE_ENV] = saved
    cluster.wait_for_nodes()
    try:
        yield node
    finally:
        cluster.remove_node(node)
        cluster.wait_for_nodes()


def _preflight(model):
    return run_preflight(str(model), 1, 2, timeout_s=TIMEOUT_S, cpus_per_worker=1.0)


def test_preflight_passes_on_a_healthy_cluster_and_llm_spans_both_nodes(cluster_a, tiny_llama_dir):
    cluster, node_a = cluster_a
    with second_node(cluster) as node_b:
        result = _preflight(tiny_llama_dir)
        assert result.ok, result.table()
        assert {r.node_id for r in result.rows} == {node_a.node_id, node_b.node_id}
        driver = local_versions()
        for row in result.rows:
            assert len(row.ranks) == 1 and row.facts["collectives"] == "ok"
            assert row.facts["torch"] == driver["torch"] and row.facts["model"] == "ok"
            assert row.facts["device"] == "cpu/gloo"
        table = result.table()
        assert "pre-flight passed" in table and node_b.node_id[:8] in table

        # LLM(...) on this multi-node cluster runs the same check first, then places its two stages
        # on the two nodes (1 CPU per worker, 1 CPU per node)
        with LLM(str(tiny_llama_dir), pipeline_parallel_size=2, address=cluster.address, cpus_per_worker=1.0,
                 preflight_timeout_s=TIMEOUT_S) as llm:
            assert set(llm.executor.node_ids.values()) == {node_a.node_id, node_b.node_id}
            out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4),
                               use_tqdm=False)
        from tests.fixtures.reference import hf_greedy

        assert out[0].outputs[0].token_ids == hf_greedy(str(tiny_llama_dir), [5, 6, 7], 4, stop_at_eos=True)[0]


def test_preflight_names_the_node_whose_model_folder_is_missing(cluster_a, tiny_llama_dir):
    cluster, _ = cluster_a
    with second_node(cluster, {"missing": [str(tiny_llama_dir)]}) as broken:
        start = time.monotonic()
        result = _preflight(tiny_llama_dir)
        assert time.monotonic() - start < TIMEOUT_S + 15
        assert not result.ok
        bad = [r for r in result.rows if not r.ok]
        assert [r.node_id for r in bad] == [broken.node_id], result.table()
        message = result.first_problem()
        assert broken.node_id[:12] in message and "does not exist on this node" in message
        assert str(tiny_llama_dir) in message and "copy it there" in message


def test_preflight_names_the_node_with_another_torch_and_llm_refuses_to_start(cluster_a, tiny_llama_dir,
                                                                                capsys):
    cluster, _ = cluster_a
    with second_node(cluster, {"versions": {"torch": "0.0.1"}}) as broken:
        result = _preflight(tiny_llama_dir)
        assert not result.ok
        message = result.first_problem()
        assert broken.node_id[:12] in message
        assert "torch 0.0.1 differs from the driver's" in message and "install torch" in message
        # LLM(...) runs the same check on a multi-node cluster, before any worker starts
        with pytest.raises(PreflightError, match=r"pre-flight failed: node .*torch 0\.0\.1 differs"):
            LLM(str(tiny_llama_dir), pipeline_parallel_size=2, address=cluster.address, cpus_per_worker=1.0,
                preflight_timeout_s=TIMEOUT_S)
        # and so does `shardline serve`, before it deploys anything
        from cluster.cli import main

        code = main(["serve", str(tiny_llama_dir), "--pipeline-parallel-size", "2", "--address", cluster.address,
                     "--cpus-per-worker", "1", "--name", "pf"])
        err = capsys.readouterr().err
        assert code == 2 and "pre-flight failed: node" in err and "torch 0.0.1 differs" in err, err
        assert "--skip-preflight" in err
