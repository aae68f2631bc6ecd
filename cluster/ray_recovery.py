"""Rebuilding a failed replica of a `RayExecutor`: release, restart budget, rebuild.

A failed replica is torn down (actors killed, its own placement groups removed - an
ExistingGroup stays and its bundles are reused) and rebuilt by the executor's start-up steps
4-8 (placement waits up to `placement_timeout_s` for capacity to come back). At most
`max_restarts` rebuilds over the executor's life; past it, or if a rebuild fails, the executor
is dead (`EngineDeadError` with both causes). Each rebuild is logged (rank, cause, time to
rebuild and its phases).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from cluster.ray_steps import Failure
from cluster.ray_workers import remove_groups
from scheduler.executor import ReplicaRecovery

if TYPE_CHECKING:
    from cluster.ray_executor import RayExecutor

logger = logging.getLogger(__name__)


class Recovery:
    """The restart budget of one executor and the rebuilds it pays for."""

    def __init__(self, executor: RayExecutor) -> None:
        self.ex = executor
        self.restarts = 0                                                # replica rebuilds so far

    def recover(self, failures: dict[int, Failure]) -> list[ReplicaRecovery]:
        """Rebuild the failed replicas (new placement groups, actors, process groups, weights). Every
        attempt uses one restart per replica, so a rank that fails during its own rebuild is tried
        again while the budget lasts; past `max_restarts`, or when the budget runs out on a failed
        rebuild, the executor is dead."""
        ex = self.ex
        budget = ex.config.max_restarts
        first = next(iter(failures.values()))
        replicas = sorted(failures)
        while True:
            if self.restarts + len(replicas) > budget:
                ex.die(f"{first.cause}; not rebuilt: the restart budget is used up (max_restarts={budget}, "
                       f"{self.restarts} used)", first.exc)
            self.restarts += len(replicas)
            self.release(replicas)
            try:
                infos = ex.start_replicas(replicas)
                break
            except BaseException as e:   # noqa: BLE001 - a failed rebuild is retried, or ends the engine
                ex.dead = None           # a failed start-up wait marks the executor dead; the budget decides
                self.release(replicas)
                if self.restarts + len(replicas) > budget:
                    ex.die(f"{first.cause}; the rebuild of replica(s) {replicas} failed: {e}", e)
                logger.error("the rebuild of replica(s) %s failed (%s); trying again", replicas, e)
        blocks = min(info["num_kv_blocks"] for info in infos)
        if blocks < ex.num_kv_blocks:
            ex.die(f"{first.cause}; the rebuilt replica(s) {replicas} hold {blocks} KV blocks, fewer than the "
                   f"{ex.num_kv_blocks} the scheduler plans with", None)
        done = time.monotonic()
        recoveries = [ReplicaRecovery(r, failures[r].cause, failures[r].detected_at, done, self.restarts)
                      for r in replicas]
        for rec in recoveries:
            logger.warning("replica %d rebuilt: detected -> serving again in %.2f s (%d of max_restarts=%d used; %s)",
                           rec.replica, rec.recovery_s, self.restarts, budget,
                           ", ".join(f"{k} {v:.2f} s" for k, v in ex.start_phases_s.items()))
        return recoveries

    def release(self, replicas: list[int]) -> None:
        """Kill the replicas' actors and remove their own placement groups (an ExistingGroup stays)."""
        ex = self.ex
        for r in replicas:
            ex.kill_replica(r)
        for rank in ex.ranks:
            if rank.replica in replicas:
                ex.workers[rank.global_rank] = None
        groups = [g for (r, _), g in ex.groups.items() if r in replicas]
        ex.groups = {k: g for k, g in ex.groups.items() if k[0] not in replicas}
        remove_groups(groups)
