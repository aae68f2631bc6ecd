"""Issue 12, test 7: the node holding one pipeline stage is removed (`Cluster.remove_node`).

Two 1-CPU nodes hold the two stages of a TP=2 x PP=2 engine. Removing stage 1's node fails the
next step; the rebuild keeps the replica's placement groups and waits for Ray to re-place the
removed node's bundles; a new node joins (once our group is seen waiting for capacity), and the
replica is rebuilt there with greedy outputs equal to the undisturbed run. Removing a node
again with no capacity left is a clear `EngineDeadError` naming the placement that could not
be met, within the placement deadline.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import ray

from cluster.llm import LLM
from scheduler.executor import EngineDeadError
from scheduler.sampling_params import SamplingParams
from tests.ray.common import mixed_prompts
from tests.ray.conftest import simulated_cluster

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

PROMPTS = mixed_prompts(vocab=509, lengths=(3, 17, 7, 12))
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def generate(llm: LLM) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def node_of_stage(llm: LLM, stage: int) -> str:
    return llm.executor.node_ids[(0, stage, 0)]


def wait_for_our_pending_group(timeout_s: float) -> bool:
    """True once one of our placement groups waits for capacity (the rebuild keeps the replica's
    groups, and Ray re-places the bundles of the removed node: RESCHEDULING)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        table = ray.util.placement_group_table()
        if any(g.get("name", "").startswith("shardline-") and g.get("state") in ("PENDING", "RESCHEDULING")
               for g in table.values()):
            return True
        time.sleep(0.1)
    return False


def test_removed_node_recovers_once_capacity_is_back_else_a_clear_error(tiny_llama_dir, ray_tmpdir):
    with simulated_cluster({"a": {"num_cpus": 1}, "b": {"num_cpus": 1}}) as (cluster, nodes):
        by_id = {n.node_id: n for n in nodes.values()}
        llm = LLM(str(tiny_llama_dir), tensor_parallel_size=2, pipeline_parallel_size=2, address=cluster.address,
                  cpus_per_worker=0.5, preflight=False, placement_timeout_s=120.0, max_restarts=2)
        try:
            expected = generate(llm)
            assert node_of_stage(llm, 0) != node_of_stage(llm, 1)
            # 1. stage 1's node goes; a node comes back while the rebuild waits for placement
            gone = node_of_stage(llm, 1)
            result: dict = {}

            def run():
                try:
                    result["tokens"] = generate(llm)
                except BaseException as e:   # noqa: BLE001 - the test inspects it
                    result["error"] = e

            removed_at = time.monotonic()
            cluster.remove_node(by_id.pop(gone))
            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            assert wait_for_our_pending_group(60.0), f"the rebuild never asked for placement: {result}"
            cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)   # (main thread: Ray needs signals)
            thread.join(timeout=180)
            assert not thread.is_alive(), "generate() hung"
            assert result.get("tokens") == expected, result
            rec = llm.engine.recoveries[-1]
            assert "pp=1" in rec.cause and "died" in rec.cause, rec.cause
            assert gone not in llm.executor.node_ids.values()
            print(f"node of stage 1 removed: detected {rec.detected_at - removed_at:.2f} s after remove_node, "
                  f"replica rebuilt on the new node in {rec.recovery_s:.2f} s (includes the node's start)")
            # 2. again, with no spare capacity and a short placement deadline: a clear error
            llm.executor.config = dataclasses.replace(llm.executor.config, placement_timeout_s=3.0)
            cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == node_of_stage(llm, 1)))
            t0 = time.monotonic()
            with pytest.raises(EngineDeadError, match=r"rebuild of replica\(s\) \[0\] failed: .*could not reserve "
                                                      r"the placement group"):
                generate(llm)
            print(f"no capacity left: EngineDeadError after {time.monotonic() - t0:.2f} s")
        finally:
            llm.shutdown()
