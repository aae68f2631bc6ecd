"""What goes wrong fails fast and clearly, and leaves nothing of ours behind.

- impossible layouts fail before Ray starts anything;
- missing resources fail before any actor starts, with a message that says what is missing;
- after `shutdown()` no actor or placement group of ours is alive;
- with `max_restarts=0` (fail-stop), `ray.kill` of one worker mid-generation fails the pending
  requests with `EngineDeadError` within 5 s, and the process does not hang (recovery within the
  restart budget is tests/ray/test_recovery.py).
"""

from __future__ import annotations

import threading
import time

import pytest
import ray
from ray.util.state import list_actors, list_placement_groups

from cluster.llm import LLM
from cluster.placement import ResourceError
from scheduler.executor import EngineDeadError
from scheduler.sampling_params import SamplingParams
from sharding.plan import LayoutError
from tests.ray.common import mixed_prompts

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

RAY_DASHBOARD = True   # the state API (list_actors, list_placement_groups) needs it


def our_alive_actors() -> list:
    # address given explicitly: left to find Ray by itself, the state API fails when other Ray
    # instances run on the same machine
    address = ray.get_runtime_context().gcs_address
    return [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")],
                                   raise_on_missing_output=False)
            if a.class_name == "ShardWorker"]


def our_live_placement_groups() -> list:
    address = ray.get_runtime_context().gcs_address
    return [g for g in list_placement_groups(address=address, raise_on_missing_output=False)
            if g.name.startswith("shardline-") and g.state != "REMOVED"]


# -- before Ray: these tests must run before the module's Ray starts (they do not use ray_local)

@pytest.mark.parametrize("tp,pp,match", [
    (9, 1, "tensor_parallel_size=9 exceeds num_attention_heads=8 .* the largest that works is 8"),
    (1, 5, "pipeline_parallel_size=5"),   # 4 layers: 5 stages is too many
])
def test_impossible_layout_fails_before_ray_starts(tiny_llama_dir, tp, pp, match):
    assert not ray.is_initialized()
    with pytest.raises(LayoutError, match=match):
        LLM(str(tiny_llama_dir), tensor_parallel_size=tp, pipeline_parallel_size=pp)
    assert not ray.is_initialized()


def test_missing_model_fails_before_ray_starts(tmp_path):
    with pytest.raises(FileNotFoundError):
        LLM(str(tmp_path / "nowhere"), pipeline_parallel_size=2)
    assert not ray.is_initialized()


# -- with the module's Ray (2 CPUs, no GPU)

@pytest.mark.parametrize("options,match", [
    ({"cpus_per_worker": 2.0}, r"needs 2 workers x 2.0 CPU = 4.0 CPU; the cluster has 2.0 CPU free"),
    ({"use_gpu": True}, r"needs 2 workers x 1 GPU = 2 GPU; the cluster has 0 GPU free"),
])
def test_missing_resources_fail_before_any_actor_starts(tiny_llama_dir, ray_local, options, match):
    with pytest.raises(ResourceError, match=match):
        LLM(str(tiny_llama_dir), pipeline_parallel_size=2, address=ray_local, resource_wait_s=0.5, **options)
    assert our_alive_actors() == []
    assert our_live_placement_groups() == []


def test_shutdown_leaves_no_actor_or_placement_group(tiny_llama_dir, ray_local):
    llm = LLM(str(tiny_llama_dir), pipeline_parallel_size=2, address=ray_local)
    assert len(our_alive_actors()) == 2
    assert len(our_live_placement_groups()) == 2   # one per stage
    llm.shutdown()
    llm.shutdown()   # idempotent
    assert ray.is_initialized(), "an executor must not shut down a Ray it did not start"
    deadline = time.monotonic() + 10
    while (our_alive_actors() or our_live_placement_groups()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert our_alive_actors() == []
    assert our_live_placement_groups() == []


@pytest.mark.parametrize("victim", ["first stage", "last stage"])
def test_killed_worker_fails_pending_requests_within_5s(tiny_llama_dir, ray_local, victim):
    llm = LLM(str(tiny_llama_dir), tensor_parallel_size=1, pipeline_parallel_size=2, address=ray_local,
              max_restarts=0)
    try:
        prompts = mixed_prompts(vocab=509)
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        result: dict = {}

        def run():
            try:
                result["outputs"] = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            except BaseException as e:   # noqa: BLE001 - the test inspects it
                result["error"], result["at"] = e, time.monotonic()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        while llm.engine.num_steps < 5 and thread.is_alive():   # generation is under way
            time.sleep(0.01)
        assert thread.is_alive(), f"generation ended before the kill: {result}"
        worker = llm.executor.workers[0 if victim == "first stage" else -1]
        killed_at = time.monotonic()
        ray.kill(worker.actor)
        thread.join(timeout=10)
        assert not thread.is_alive(), "generate() hung after a worker died"
        assert isinstance(result.get("error"), EngineDeadError), result
        detect_s = result["at"] - killed_at
        assert detect_s < 5.0, f"took {detect_s:.1f} s to notice the dead worker"
        assert f"pp={worker.rank.pp_rank}" in str(result["error"])
        assert "died" in str(result["error"])
        assert "restart budget is used up (max_restarts=0" in str(result["error"])
        print(f"dead worker detected in {detect_s * 1000:.0f} ms: {result['error']}")
        # later requests fail at once too, instead of hanging on a half-dead pipeline
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError):
            llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=2), use_tqdm=False)
        assert time.monotonic() - t0 < 5.0
    finally:
        llm.shutdown()
    deadline = time.monotonic() + 10
    while our_alive_actors() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert our_alive_actors() == []
