"""Rebuilding failed replicas of a `RayExecutor` in the background, under a restart budget.

`start(failures)` takes the failed replicas out of `ready` (their ranks were already killed) and
rebuilds each in its own thread, so `execute` returns at once and the other replicas keep
serving. A rebuild (`RayExecutor.rebuild_replica`) keeps the replica's placement groups - Ray
re-places the bundles of a node that died, and the rebuild waits up to `placement_timeout_s` for
that - and re-runs start-up steps 5-8 (actors, rendezvous, load, warm-up). When it is done the
replica is ready again and a `ReplicaRecovery` is queued for `take_recoveries`.

Budget: every rebuild attempt uses one restart; at most `max_restarts` over the executor's
life. A failure the budget cannot cover kills the executor at once (`execute` raises
`EngineDeadError`); a rebuild that fails is tried again while the budget lasts, else the
executor is dead and the next `take_recoveries` (the engine's next step) raises. Each failure
and rebuild is logged (cause, time to rebuild and its phases); `events` keeps
(time.monotonic(), "failed" | "ready", replica) for tests and benchmarks.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from cluster.ray_steps import Failure
from scheduler.executor import EngineDeadError, ReplicaRecovery

if TYPE_CHECKING:
    from cluster.ray_executor import RayExecutor

logger = logging.getLogger(__name__)


class Recovery:
    """Which replicas take steps, the restart budget, and the rebuild threads."""

    def __init__(self, executor: RayExecutor) -> None:
        self.ex = executor
        self.restarts = 0                                   # rebuild attempts so far
        self.events: list[tuple[float, str, int]] = []      # (time.monotonic(), "failed" | "ready", replica)
        self._cond = threading.Condition()                  # guards everything below; notified on any change
        self._ready = set(range(executor.num_replicas))
        self._done: list[ReplicaRecovery] = []              # finished rebuilds not yet taken
        self._threads: list[threading.Thread] = []

    @property
    def ready(self) -> frozenset[int]:
        with self._cond:
            return frozenset(self._ready)

    def start(self, failures: dict[int, Failure]) -> None:
        """Take the failed replicas out of service and rebuild each in the background; EngineDeadError
        (the executor dies) if the restart budget does not cover them."""
        budget = self.ex.config.max_restarts
        with self._cond:
            self._ready -= set(failures)
            self.events += [(f.detected_at, "failed", r) for r, f in failures.items()]
            if self.restarts + len(failures) > budget:
                first = failures[min(failures)]
                self._cond.notify_all()
                self.ex.die(f"{first.cause}; not rebuilt: the restart budget is used up (max_restarts={budget}, "
                            f"{self.restarts} used)", first.exc)
            self.restarts += len(failures)
            for failure in failures.values():
                thread = threading.Thread(target=self._rebuild, args=(failure,), daemon=True,
                                          name=f"shardline-rebuild-replica{failure.replica}")
                self._threads.append(thread)
                thread.start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Block up to `timeout_s` until some replica is ready, or the executor is dead or closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self.ex.dead is not None or self.ex.closed, timeout_s)
            return bool(self._ready)

    def take_recoveries(self) -> list[ReplicaRecovery]:
        with self._cond:
            if self.ex.dead is not None:
                raise EngineDeadError(self.ex.dead)
            done, self._done = self._done, []
            return done

    def join(self, timeout_s: float) -> None:
        """Wait (bounded) for the rebuild threads; they stop soon after the executor is closed."""
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # -- the rebuild thread -----------------------------------------------------------------

    def _rebuild(self, failure: Failure) -> None:
        replica, budget = failure.replica, self.ex.config.max_restarts
        while True:
            try:
                infos, phases = self.ex.rebuild_replica(replica)
                blocks = min(info["num_kv_blocks"] for info in infos)
                if blocks < self.ex.num_kv_blocks:
                    self._end(f"{failure.cause}; the rebuilt replica {replica} holds {blocks} KV blocks, fewer "
                              f"than the {self.ex.num_kv_blocks} the scheduler plans with")
                    return
                break
            except BaseException as e:   # noqa: BLE001 - a failed rebuild is retried, or ends the engine
                if self.ex.closed:
                    return
                self.ex.kill_replica(replica)
                with self._cond:
                    retry = self.restarts + 1 <= budget
                    self.restarts += retry
                if not retry:
                    self._end(f"{failure.cause}; the rebuild of replica(s) [{replica}] failed: {e}")
                    return
                logger.error("the rebuild of replica %d failed (%s); trying again", replica, e)
        with self._cond:
            if self.ex.closed or self.ex.dead is not None:
                return
            rec = ReplicaRecovery(replica, failure.cause, failure.detected_at, time.monotonic(), self.restarts)
            self._ready.add(replica)
            self._done.append(rec)
            self.events.append((rec.recovered_at, "ready", replica))
            self._cond.notify_all()
        logger.warning("replica %d rebuilt: detected -> serving again in %.2f s (%d of max_restarts=%d used; %s)",
                       replica, rec.recovery_s, rec.restarts_used, budget,
                       ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))

    def _end(self, message: str) -> None:
        """A rebuild that cannot succeed: the executor is dead; the engine's next step raises."""
        with self._cond:
            if self.ex.dead is None:
                self.ex.dead = message
            self._cond.notify_all()
        logger.error("engine dead: %s", message)
