"""Where one engine's workers live: placement groups, `ShardWorker` actors, and their release.

Two ways to place workers (`WorkerPlacement`):
- own groups (offline `LLM`): one STRICT_PACK placement group per (replica, stage), so a TP group
  shares a node while stages may spread; the executor reserves and later removes them;
- an existing group (a Serve replica): the replica's own placement group, whose bundle 0 is the
  replica itself and bundles 1.. hold the workers in (stage, tp rank) order (see
  `cluster.serve.engine_deployment`); Serve reserves and removes it.

Every function here is one start-up or shutdown step of `RayExecutor`; none knows about steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.placement import GroupSpec, Layout, RankInfo, ResourceError, bundles_for
from cluster.worker import ShardWorker

logger = logging.getLogger(__name__)


class PlacementTimeoutError(ResourceError):
    """A placement group could not be reserved in time (the cluster lacks room where it is needed)."""


@dataclass
class Worker:
    rank: RankInfo
    actor: ray.actor.ActorHandle
    node_id: str = "?"
    node_ip: str = "?"
    pid: int | None = None

    def describe(self) -> str:
        return f"{self.rank.describe()} on node {self.node_ip} ({self.node_id[:12]}, pid {self.pid})"


@dataclass(frozen=True)
class ExistingGroup:
    """Workers go into bundles `first_bundle + local_rank` of a placement group someone else owns."""

    group: PlacementGroup
    first_bundle: int = 1


def reserve_placement_groups(layout: Layout, replicas: list[int], name_prefix: str,
                             timeout: float) -> dict[tuple[int, int], PlacementGroup]:
    """One STRICT_PACK group per (replica, stage); never wait on Ray forever.

    Returns {(replica, stage): group}; on a timeout (or any error) the groups made so far are removed.
    """
    specs = [g for g in bundles_for(layout.dp, layout.pp, layout.tp, layout.use_gpu, layout.cpus_per_worker)
             if g.replica in replicas]
    groups: dict[tuple[int, int], PlacementGroup] = {}
    try:
        for s in specs:
            groups[(s.replica, s.pp_rank)] = placement_group(list(s.bundles), strategy=s.strategy,
                                                             name=f"{name_prefix}-r{s.replica}-pp{s.pp_rank}")
        ready = {groups[(s.replica, s.pp_rank)].ready(): s for s in specs}
        done, pending = ray.wait(list(ready), num_returns=len(ready), timeout=timeout)
        if pending:
            raise PlacementTimeoutError(placement_message(layout, [ready[r] for r in pending], timeout))
        ray.get(done)
    except BaseException:
        remove_groups(list(groups.values()))
        raise
    return groups


def wait_placed(layout: Layout, groups: dict[tuple[int, int], PlacementGroup], timeout: float,
                closed: Callable[[], bool]) -> None:
    """Wait until every bundle of our kept `groups` sits on a live node (bounded; polled).

    A rebuild keeps the replica's groups: when a node dies, Ray re-places the bundles it held
    (state RESCHEDULING, then CREATED again once some node has room). The node check covers the
    moment before Ray has noticed the death. PlacementTimeoutError at the deadline, as at start-up.
    """
    from ray.util.placement_group import placement_group_table

    deadline = time.monotonic() + timeout
    while True:
        table = placement_group_table()
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        pending = [key for key, g in groups.items() if not _placed(table.get(g.id.hex(), {}), alive)]
        if not pending:
            return
        if closed():
            raise RuntimeError("the executor was shut down while waiting for placement")
        if time.monotonic() > deadline:
            specs = [s for s in bundles_for(layout.dp, layout.pp, layout.tp, layout.use_gpu, layout.cpus_per_worker)
                     if (s.replica, s.pp_rank) in pending]
            raise PlacementTimeoutError(placement_message(layout, specs, timeout))
        time.sleep(0.1)


def _placed(entry: dict, alive: set[str]) -> bool:
    nodes = entry.get("bundles_to_node_id") or {}
    return entry.get("state") == "CREATED" and bool(nodes) and all(n in alive for n in nodes.values())


def spawn_worker(rank: RankInfo, layout: Layout, strategy: PlacementGroupSchedulingStrategy,
                 runtime_env: dict, name: str, standby: bool = False) -> Worker:
    """One `ShardWorker` actor pinned to its bundle; never restarted by Ray (the executor decides).
    A standby (`cluster.ray_standby`) reserves nothing: the bundle's CPU is its worker's."""
    actor = ray.remote(ShardWorker).options(
        num_cpus=0 if standby else layout.cpus_per_worker, num_gpus=1 if layout.use_gpu and not standby else 0,
        max_concurrency=1, max_restarts=0, max_task_retries=0,
        scheduling_strategy=strategy, runtime_env=runtime_env, name=name,
    ).remote(layout.cpus_per_worker, standby)
    return Worker(rank, actor)


def strategy_for(rank: RankInfo, groups: dict[tuple[int, int], PlacementGroup] | None,
                 existing: ExistingGroup | None) -> PlacementGroupSchedulingStrategy:
    """Own groups: bundle tp_rank of the (replica, stage) group. Existing group: bundle first + local rank."""
    if existing is not None:
        group, index = existing.group, existing.first_bundle + rank.local_rank
    else:
        group, index = groups[(rank.replica, rank.pp_rank)], rank.bundle_index
    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=index,
                                            placement_group_capture_child_tasks=False)


def remove_groups(groups: list[PlacementGroup]) -> None:
    """Remove our placement groups and wait (bounded) until their resources are free again."""
    for group in groups:
        quietly(remove_placement_group, group)
    quietly(wait_removed, groups, timeout_s=5.0)


def wait_removed(groups: list[PlacementGroup], timeout_s: float) -> None:
    """Wait (bounded) until Ray reports our placement groups removed, so their CPUs are free again."""
    from ray.util.placement_group import placement_group_table

    ids = {g.id.hex() for g in groups}
    deadline = time.monotonic() + timeout_s
    while ids and time.monotonic() < deadline:
        table = placement_group_table()
        if all(table.get(i, {}).get("state", "REMOVED") == "REMOVED" for i in ids):
            return
        time.sleep(0.05)


def placement_message(layout: Layout, pending: list[GroupSpec], timeout: float) -> str:
    where = ", ".join(f"(replica {g.replica}, stage {g.pp_rank})" for g in pending)
    bundle = pending[0].bundles[0]
    return (f"layout {layout}: could not reserve the placement group of {where} within {timeout:g} s. Each "
            f"needs {layout.tp} x {bundle} on one node ({pending[0].strategy}); the free resources are spread "
            f"too thin or taken by others (`ray status` shows them). Lower tensor_parallel_size or "
            f"cpus_per_worker, free resources, or add a node.")


def quietly(fn, *args, **kwargs) -> None:
    """Best-effort clean-up: a failure to clean one thing must not stop cleaning the rest."""
    try:
        fn(*args, **kwargs)
    except Exception:   # noqa: BLE001 - clean-up must go on
        logger.debug("clean-up step %s failed", getattr(fn, "__name__", fn), exc_info=True)
