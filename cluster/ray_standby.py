"""Standby workers: one started, idle `ShardWorker` per rank, so a rebuild skips process start.

A cold rebuild of a replica (`RayExecutor.rebuild_replica`) spends most of its time before any
weight is read: starting a Ray worker process per rank and importing torch and the model code
(6-8 s of a 13-17 s rebuild of 4 ranks on 2 cores). With `EngineConfig.standby_workers`, each
rank has a twin actor started in the same placement-group bundle (so on the same node, under the
same placement rules) that has already done those imports (`ShardWorker.prepare`) and then only
waits. A rebuild takes a whole replica's standbys as its new workers - they still join a new
process group and load the rank's slices - and a new set is started once the replica serves again.

Standbys reserve no CPU (`num_cpus=0`): the bundle's CPU stays reserved for the rank's worker,
and a standby that becomes the worker runs on it once the dead worker is gone. The price is one
idle process per rank (torch imported, no weights) and, after every rebuild, CPU to start the
next set in the background - one standby at a time, at a lower CPU priority (nice +10 until it
is taken into service), so the ranks that serve keep their cores and meet their step deadlines.
CPU only so far: on a GPU node Ray gives a GPU only to an actor that asks for one, and a bundle
holds one GPU for its worker.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

import ray
from ray.exceptions import RayError

from cluster.ray_connect import worker_runtime_env
from cluster.ray_workers import quietly, spawn_worker, strategy_for
from scheduler.config import ConfigError

if TYPE_CHECKING:
    from cluster.ray_executor import RayExecutor

logger = logging.getLogger(__name__)

ALIVE_WAIT_S = 1.0      # how long `take` waits for a standby's answer before trusting it is still starting


class Standby:
    """The executor's standby actors by global rank; empty unless `config.standby_workers`."""

    def __init__(self, executor: RayExecutor) -> None:
        self.ex = executor
        self.actors: dict[int, ray.actor.ActorHandle] = {}   # global rank -> a started standby
        self._sets = 0                                      # sets started: new actor names
        self._lock = threading.Condition()                  # guards `actors` (the fill thread adds to it)
        self._starting: list[ray.actor.ActorHandle] = []    # spawned, not yet prepared

    @property
    def enabled(self) -> bool:
        return bool(self.ex.config.standby_workers)

    def check(self) -> None:
        """Before anything starts: standbys need a CPU layout (see the module docstring)."""
        if self.enabled and self.ex.layout.use_gpu:
            raise ConfigError("standby_workers=True is CPU-only so far: a standby actor would need a GPU of its "
                              "own in the worker's bundle; drop standby_workers or use_gpu", "standby_workers", True)

    def fill(self, replicas: list[int]) -> None:
        """Start a standby for every rank of these replicas that has none, one after another in a
        background thread; returns at once."""
        if not self.enabled or self.ex.closed:
            return
        self._sets += 1
        threading.Thread(target=self._fill, args=(list(replicas), self._sets), daemon=True,
                         name=f"shardline-standby-{self._sets}").start()

    def _fill(self, replicas: list[int], set_no: int) -> None:
        ex = self.ex
        runtime_env = worker_runtime_env()   # the workers' (cluster/ray_executor.py), once per set
        for rank in ex.ranks:
            if rank.replica not in replicas or rank.global_rank in self.actors or ex.closed:
                continue
            name = f"{ex.name_prefix}-standby{set_no}-rank{rank.global_rank}"
            actor = spawn_worker(rank, ex.layout, strategy_for(rank, ex.groups, ex.placement),
                                 runtime_env, name, standby=True).actor
            with self._lock:
                self._starting.append(actor)
            try:   # imports now (torch, the model code, the HF config class), then it waits
                ray.get(actor.prepare.remote(ex.config.model), timeout=ex.config.startup_timeout_s or 300.0)
            except Exception as e:   # noqa: BLE001 - a standby that cannot start only costs speed
                quietly(ray.kill, actor, no_restart=True)
                if not ex.closed:
                    logger.warning("a standby worker for %s did not start (%s); its replica's next rebuild "
                                   "starts new actors", rank.describe(), e)
                return
            finally:
                with self._lock:
                    self._starting.remove(actor)
            with self._lock:
                if ex.closed:
                    quietly(ray.kill, actor, no_restart=True)
                    return
                self.actors[rank.global_rank] = actor
                self._lock.notify_all()

    def wait_full(self, timeout_s: float) -> bool:
        """Block (at most `timeout_s`) until every rank has a started standby (tests, benchmarks)."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self.actors) == len(self.ex.ranks), timeout_s)

    def take(self, replica: int) -> dict[int, ray.actor.ActorHandle]:
        """All of this replica's standbys (global rank -> actor), removed from the set; {} unless every
        rank has one (a replica is rebuilt whole)."""
        ranks = [r.global_rank for r in self.ex.ranks if r.replica == replica]
        with self._lock:
            if not ranks or any(g not in self.actors for g in ranks):
                return {}
            taken = {g: self.actors.pop(g) for g in ranks}
        if not self._alive(list(taken.values())):   # e.g. their node died with the worker's
            for actor in taken.values():
                quietly(ray.kill, actor, no_restart=True)
            logger.warning("replica %d: a standby worker is dead; rebuilding on new actors", replica)
            return {}
        logger.info("replica %d: rebuilding on %d standby workers", replica, len(taken))
        return taken

    @staticmethod
    def _alive(actors: list) -> bool:
        """False if any of them is known dead (all are prepared: one that does not answer in time is busy)."""
        pings = [a.ping.remote() for a in actors]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=ALIVE_WAIT_S)
        try:
            ray.get(ready)
        except RayError:
            return False
        return True

    def shutdown(self) -> None:
        """Kill every standby, started or starting (the executor is closed: the fill thread stops)."""
        with self._lock:
            actors, self.actors = list(self.actors.values()) + self._starting, {}
        for actor in actors:
            quietly(ray.kill, actor, no_restart=True)
