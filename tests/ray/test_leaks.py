"""Issue 12 test 12 (first half): create/destroy cycles of `LLM` leave nothing behind.

After every cycle no actor or placement group of ours is alive and no `ray::ShardWorker` process
is left; across the cycles the driver's RSS and open file descriptors do not grow. `make test`
runs LEAK_CYCLES=2 cycles; `make leaks` runs the issue's 20 (SHARDLINE_LEAK_CYCLES=20).
"""

from __future__ import annotations

import gc
import os
import time

import psutil
import pytest
import ray
from ray.util.state import list_actors, list_placement_groups

from cluster.llm import LLM
from scheduler.sampling_params import SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]

RAY_DASHBOARD = True   # the state API needs it
LEAK_CYCLES = int(os.environ.get("SHARDLINE_LEAK_CYCLES", "2"))
FD_SLACK = 8                    # sockets Ray's client may open lazily (first cycles), not per cycle
RSS_SLACK = 64 * 2**20          # allocator noise; a leak of one model's worth per cycle would exceed it


def leftovers() -> tuple[list, list, list]:
    """(our live actors, our live placement groups, ShardWorker processes) on this machine's Ray."""
    # the address given explicitly: left to find Ray by itself, the state API fails when other Rays run here
    address = ray.get_runtime_context().gcs_address
    job = ray.get_runtime_context().get_job_id()
    actors = [a.class_name for a in list_actors(address=address, filters=[("state", "=", "ALIVE")],
                                                raise_on_missing_output=False) if a.job_id == job]
    groups = [g.placement_group_id for g in list_placement_groups(address=address, raise_on_missing_output=False)
              if g.creator_job_id == job and g.state != "REMOVED"]
    # ray.init started this session's raylet as our child, and it starts the workers: our descendants
    procs = [p.pid for p in psutil.Process().children(recursive=True) if _is_shard_worker(p)]
    return actors, groups, procs


def _is_shard_worker(proc: psutil.Process) -> bool:
    try:
        return any("ray::ShardWorker" in part for part in proc.cmdline())
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def _wait_clean(deadline_s: float = 20.0) -> tuple[list, list, list]:
    deadline = time.monotonic() + deadline_s
    while True:
        left = leftovers()
        if not any(left) or time.monotonic() > deadline:
            return left
        time.sleep(0.25)


def test_llm_create_destroy_cycles_leak_nothing(tiny_llama_dir, ray_local):
    me = psutil.Process()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    marks, want = [], None
    for cycle in range(LEAK_CYCLES):
        # every other cycle with standby actors (cluster/ray_standby.py): they must go with the engine
        with LLM(str(tiny_llama_dir), pipeline_parallel_size=2, address=ray_local,
                 standby_workers=cycle % 2 == 1) as llm:
            tokens = llm.generate({"prompt_token_ids": [5, 6, 7]}, params, use_tqdm=False)[0].outputs[0].token_ids
        assert want is None or tokens == want
        want = tokens
        assert _wait_clean() == ([], [], []), f"cycle {cycle} left something behind"
        gc.collect()
        marks.append((me.memory_info().rss, me.num_fds()))
    (rss0, fds0), (rss1, fds1) = marks[0], marks[-1]
    print(f"{LEAK_CYCLES} LLM cycles: driver RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB, "
          f"open fds {fds0} -> {fds1}")
    assert fds1 - fds0 <= FD_SLACK, marks
    assert rss1 - rss0 <= RSS_SLACK, marks
