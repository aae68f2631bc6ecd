"""`RayExecutor`: runs T x P x D ranks as Ray actors and feeds them the engine's micro-batches.

Start-up (`_start`) is numbered steps; each fails with a message that says what to change:

    1 validate   the layout against the model's config.json (T <= attention heads, layers >= P)
    2 connect    join `address` / RAY_ADDRESS, or start a local Ray on 127.0.0.1
    3 resources  enough CPUs (and GPUs) free for every worker, a TP group fits one node
    4 placement  one placement group per (replica, stage), reserved within a deadline
    5 actors     one `ShardWorker` per rank, pinned to its bundle
    6 rendezvous each replica's local rank 0 picks an ephemeral port; all ranks join at once
    7 load       (inside 6) each rank builds its stage and loads only its own slices
    8 warm-up    one 1-token sequence through every replica's pipeline, then forgotten

Steps 4-8 take a list of replicas so that one replica can later be rebuilt alone. Placement
groups and actors are made by `cluster.ray_workers`; naming the rank that failed a wait is
`cluster.ray_failures`. With `placement=ExistingGroup(group)` (a Serve replica) steps 3-4 are
skipped: the workers go into bundles 1.. of a group the caller reserved, and shutdown leaves it.

Per `execute(steps)`: `cluster.ray_steps` sends every micro-batch to every worker of its replica
and collects the results with a deadline (`step_timeout_s`), replica by replica: a dead actor, a
raised exception or a rank still busy at the deadline fails that replica, named by rank, node,
pid and cause, and its other workers are killed at once so nothing hangs; the other replicas'
results are still collected. `submit` + `collect` are the same call in two halves, for the
pipelined engine (`scheduler.pipelined`) that keeps micro-batches in flight across steps.

Recovery (`cluster.ray_recovery`): `execute` raises `ReplicasFailedError` at once with the
healthy replicas' outputs, and the failed replica is rebuilt in a background thread (its own
placement groups kept, steps 5-8 again) while the other replicas keep serving; `ready_replicas`
says which replicas take steps, `take_recoveries` reports finished rebuilds. At most
`max_restarts` rebuilds over the executor's life; past it, or if a rebuild fails, the executor is
dead and the engine gets `EngineDeadError` with both causes.

With `standby_workers` a rebuild takes over a started, idle actor per rank (`cluster.ray_standby`).
Options: the `EngineConfig` fields under "Ray executor" (so `LLM(...)` keywords).

Clusters: run the driver with `ray job submit --working-dir . --runtime-env-json
'{"excludes": [".venv"]}' -- python ...` so every node imports `cluster`, `sharding` and
`scheduler` from the uploaded directory; locally the workers get the repo root on PYTHONPATH.
Only run on CPU (gloo) so far; the GPU path is the same code with `GPU: 1` per worker.
"""

from __future__ import annotations

import logging
import time
import uuid
from functools import partial

import ray
from ray.util.placement_group import PlacementGroup

from cluster.layer_split import plan_for, resolve_layer_split
from cluster.placement import Layout, ResourceError, check_resources, default_cpu_share, rank_grid
from cluster.ray_connect import connect, worker_runtime_env
from cluster.ray_recovery import Recovery
from cluster.ray_standby import Standby
from cluster.ray_steps import Failure, InFlight, check_ready, collect, decode, submit, wait_all
from cluster.ray_workers import (
    ExistingGroup,
    PlacementTimeoutError,
    Worker,
    quietly,
    remove_groups,
    reserve_placement_groups,
    spawn_worker,
    strategy_for,
    wait_placed,
)
from scheduler.config import EngineConfig
from scheduler.executor import EngineDeadError, ReplicaFailure, ReplicaRecovery, ReplicasFailedError
from scheduler.wire import NewSequence, ScheduledSequence, SeqSampling, StepInput, StepOutput

__all__ = ["ExistingGroup", "PlacementTimeoutError", "RayExecutor"]

logger = logging.getLogger(__name__)

WARMUP_SEQ_ID = -1              # never a real request's id


class RayExecutor:
    """T x P x D `ShardWorker` actors behind the `Executor` protocol (see the module docstring)."""

    def __init__(self, config: EngineConfig, address: str | None = None,
                 placement: ExistingGroup | None = None) -> None:
        if placement is not None and config.data_parallel_size != 1:
            raise ValueError(f"placement=ExistingGroup holds one replica; got data_parallel_size="
                             f"{config.data_parallel_size} (a Serve application runs D replicas instead)")
        self.config = config
        self.placement = placement
        self.num_replicas = config.data_parallel_size
        self.max_in_flight = config.pipeline_parallel_size
        self.num_kv_blocks = 0
        self.max_model_len = 0
        self.ranks = rank_grid(config.data_parallel_size, config.pipeline_parallel_size, config.tensor_parallel_size)
        self.workers: list[Worker | None] = [None] * len(self.ranks)   # by global rank
        self.groups: dict[tuple[int, int], PlacementGroup] = {}          # (replica, stage) -> group
        self.worker_info: list[dict] = []                                # what each rank's init returned
        self.layout: Layout | None = None
        self.started_ray = False
        self.name_prefix = f"shardline-{uuid.uuid4().hex[:8]}"
        self.dead: str | None = None
        self.recovery = Recovery(self)                                   # restart budget, rebuilds
        self.standby = Standby(self)                                     # idle actors for rebuilds
        self.start_phases_s: dict[str, float] = {}                       # of the last (re)start, for logs
        self.closed = False
        self._generation = 0                                             # rebuilds so far: new actor names
        try:
            self._start(address)
        except BaseException as e:
            self.dead = str(e)
            self.shutdown()
            raise

    # ------------------------------------------------------------------ start-up

    def _start(self, address: str | None) -> None:
        cfg = self.config
        t0 = time.perf_counter()
        # 1. validate: an impossible layout or a missing model fails before Ray starts anything
        from sharding.plan import check_layout, load_hf_config
        from sharding.runner import max_model_len_for

        self.plan = check_layout(cfg.model, cfg.tensor_parallel_size, cfg.pipeline_parallel_size, cfg.layer_split)
        self.max_model_len = max_model_len_for(cfg, load_hf_config(cfg.model))
        # 2. connect to a cluster, or start a local one
        self._connect(address)
        # 3. resources: enough free CPUs/GPUs, with a message that says what is missing (an existing
        #    group was reserved by its owner, who sized its bundles with `cpus_per_worker`)
        self.layout = self._check_resources() if self.placement is None else self._layout_for({})
        self.standby.check()
        # 4-8. per replica: placement groups, actors, rendezvous + load, warm-up
        self.worker_info, self.start_phases_s = self.start_replicas(list(range(self.num_replicas)))
        self.num_kv_blocks = min(info["num_kv_blocks"] for info in self.worker_info)
        self.standby.fill(list(range(self.num_replicas)))
        logger.info("RayExecutor %s ready in %.1f s: %d workers x %s CPU, %d KV blocks per replica",
                    self.layout, time.perf_counter() - t0, self.layout.num_workers, self.layout.cpus_per_worker,
                    self.num_kv_blocks)

    def start_replicas(self, replicas: list[int]) -> tuple[list[dict], dict[str, float]]:
        """Steps 4-8 for these replicas -> (what each rank's init returned, seconds per phase)."""
        t = [time.monotonic()]
        # 4. placement groups, bounded wait (unless the workers go into an existing group): new ones
        #    at start-up; a rebuilt replica keeps its own (Ray re-places the bundles of a dead node).
        #    layer_split="auto" is then sized for the nodes the groups landed on
        if self.placement is None:
            timeout = float(self.config.placement_timeout_s)
            kept = {k: g for k, g in self.groups.items() if k[0] in replicas}
            if kept:
                wait_placed(self.layout, kept, timeout, lambda: self.closed)
            else:
                self.groups.update(reserve_placement_groups(self.layout, replicas, self.name_prefix, timeout))
        self.config = resolve_layer_split(self.config, self.groups)
        self.plan = plan_for(self.config)
        t.append(time.monotonic())
        # 5. one actor per rank, pinned to its bundle; 6 + 7. rendezvous on an ephemeral port, each
        #    rank loads only its shard
        self._spawn_workers(replicas)
        infos = self._rendezvous_and_load(replicas, t)
        t.append(time.monotonic())
        # 8. warm-up: one tiny step through each pipeline
        self._warm_up(replicas)
        t.append(time.monotonic())
        phases = {"placement": t[1] - t[0], "actors": t[2] - t[1], "load": t[3] - t[2], "warm-up": t[4] - t[3]}
        for part in ("import", "rendezvous", "load"):   # inside "load": the slowest rank's parts
            phases[f"  rank {part}"] = max(info["seconds"][part] for info in infos)
        return infos, phases

    def rebuild_replica(self, replica: int) -> tuple[list[dict], dict[str, float]]:
        """Recovery: new actors for one replica (its old ones are killed) in its kept placement groups.
        Runs on a rebuild thread (`cluster.ray_recovery`); touches only this replica's workers."""
        self.kill_replica(replica)
        for rank in self.ranks:
            if rank.replica == replica:
                self.workers[rank.global_rank] = None
        infos, phases = self.start_replicas([replica])
        self.start_phases_s = phases
        self.standby.fill([replica])   # the next set starts while the replica serves
        return infos, phases

    def _connect(self, address: str | None) -> None:
        """Step 2. Reuse an initialized Ray; else join `address`/RAY_ADDRESS; else start a local one."""
        self.started_ray = connect(address, float(self.config.connect_timeout_s))

    def _check_resources(self) -> Layout:
        """Step 3. Decide each worker's share and check the cluster has room for all of them.

        Resources another engine just released show up in `ray.available_resources()` a moment
        later, so a shortfall is re-checked for a few seconds before it becomes an error.
        """
        deadline = time.monotonic() + float(self.config.resource_wait_s)
        # would it fit an empty cluster? if not, waiting won't help
        check_resources(self._layout_for(ray.cluster_resources()), ray.cluster_resources(), self._node_totals())
        while True:
            available = ray.available_resources()
            layout = self._layout_for(available)
            try:
                check_resources(layout, available, self._node_totals())
                return layout
            except ResourceError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)

    def _layout_for(self, available: dict) -> Layout:
        cfg = self.config
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else ray.cluster_resources().get("GPU", 0) >= 1
        share = cfg.cpus_per_worker
        if share is None:
            largest = max((float(n.get("CPU", 0.0)) for n in self._node_totals()), default=None)
            share = default_cpu_share(len(self.ranks), cfg.tensor_parallel_size, float(available.get("CPU", 0.0)),
                                      largest)
        return Layout(tp=cfg.tensor_parallel_size, pp=cfg.pipeline_parallel_size, dp=cfg.data_parallel_size,
                      cpus_per_worker=float(share), use_gpu=use_gpu)

    @staticmethod
    def _node_totals() -> list[dict]:
        return [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    def _spawn_workers(self, replicas: list[int]) -> None:
        """Step 5. One actor per rank, pinned to its bundle (see `ray_workers.strategy_for`)."""
        runtime_env = worker_runtime_env()
        gen = f"-g{self._generation}" if self._generation else ""   # a killed actor's name stays taken a moment
        self._generation += 1
        standby = {g: a for r in replicas for g, a in self.standby.take(r).items()}
        for rank in self.ranks:
            if rank.global_rank in standby:
                self.workers[rank.global_rank] = Worker(rank, standby[rank.global_rank])
            elif rank.replica in replicas:
                strategy = strategy_for(rank, self.groups, self.placement)
                name = f"{self.name_prefix}{gen}-rank{rank.global_rank}"
                self.workers[rank.global_rank] = spawn_worker(rank, self.layout, strategy, runtime_env, name)

    def _rendezvous_and_load(self, replicas: list[int], times: list[float]) -> list[dict]:
        """Steps 6-7. Every rank of a replica calls init together; all replicas load in parallel.
        Appends to `times` when every actor has started."""
        cfg = self.config
        deadline = time.monotonic() + self._startup_timeout()
        # where every worker runs (also proves each actor started)
        where = {w.actor.where.remote(): w for w in self._workers_of(replicas)}
        for w, info in zip(where.values(), self._wait(where, deadline, "start"), strict=True):
            w.node_id, w.node_ip, w.pid = info["node_id"], info["node_ip"], info["pid"]
        times.append(time.monotonic())
        inits = {}
        for replica in replicas:
            workers = self._workers_of([replica])
            master_addr, master_port = self._wait({workers[0].actor.get_address.remote(): workers[0]},
                                                  deadline, "rendezvous")[0]
            for w in workers:
                inits[w.actor.init.remote(cfg, w.rank.local_rank, master_addr, master_port)] = w
        return self._wait(inits, deadline, "load")

    def _warm_up(self, replicas: list[int]) -> None:
        """Step 8. Run one 1-token greedy sequence through each pipeline, then forget it.

        Greedy, so the replica's random generator is not advanced; block 0's K/V is overwritten
        by the first request that uses it, since the scheduler never reads a block it did not have
        computed.
        """
        seq = NewSequence(seq_id=WARMUP_SEQ_ID, token_ids=[0], num_prompt_tokens=1, block_ids=[0],
                          sampling=SeqSampling(temperature=0.0))
        steps = [StepInput(step_id=-1, replica=r, new_sequences=[seq],
                           scheduled=[ScheduledSequence(WARMUP_SEQ_ID, num_computed=0, num_new=1, sample=True)])
                 for r in replicas]
        steps += [StepInput(step_id=-2, replica=r, finished_seq_ids=[WARMUP_SEQ_ID]) for r in replicas]
        self._run(steps, time.monotonic() + self._startup_timeout(), "warm-up")

    # ------------------------------------------------------------------ steps

    def execute(self, steps: list[StepInput]) -> list[StepOutput]:
        """Run every micro-batch; one `StepOutput` per input, same order (see `cluster.ray_steps`). A
        replica whose rank died, raised or missed the step deadline starts its rebuild in the background
        and `ReplicasFailedError` carries the other replicas' outputs (see `cluster.ray_recovery`)."""
        return self.collect(self.submit(steps))

    def submit(self, steps: list[StepInput]) -> InFlight:
        """Send micro-batches to their workers and return at once (`collect` them in submission order)."""
        if self.dead is not None or self.closed:
            raise EngineDeadError(self.dead or "the executor was shut down")
        check_ready(steps, self.recovery.ready, self.num_replicas)
        return InFlight(steps, *submit(steps, self._workers_of, self.layout.pp - 1))

    def collect(self, flight: InFlight) -> list[StepOutput]:
        """`submit`ted micro-batches' outputs, waiting at most step_timeout_s from now; fails as `execute`."""
        values: dict = {}
        failures = collect(flight.refs, values, time.monotonic() + self.step_timeout_s, "step",
                           f"step_timeout_s={self.step_timeout_s:g}", self._failure)
        fatal = partial(self._fail, fatal=True)
        outputs = [None if step.replica in failures else decode(step, ref, values, flight.refs, fatal)
                   for step, ref in zip(flight.steps, flight.out_refs, strict=True)]
        if failures:
            self.recovery.start(failures)
            raise ReplicasFailedError([ReplicaFailure(f.replica, f.cause, f.detected_at) for f in failures.values()],
                                      outputs)
        return outputs

    @property
    def ready_replicas(self) -> frozenset[int]:
        """Replicas that take steps now; the others are being rebuilt (see `cluster.ray_recovery`)."""
        return self.recovery.ready

    def wait_ready(self, timeout_s: float) -> bool:
        return self.recovery.wait_ready(timeout_s)

    def take_recoveries(self) -> list[ReplicaRecovery]:
        return self.recovery.take_recoveries()

    @property
    def step_timeout_s(self) -> float:
        return float(self.config.step_timeout_s or self.config.collective_timeout_s)

    @property
    def restarts(self) -> int:
        """Replica rebuilds so far (out of `max_restarts`)."""
        return self.recovery.restarts

    def _run(self, steps: list[StepInput], deadline: float, what: str) -> list[StepOutput]:
        """Start-up steps (warm-up): any failure fails the start (or the rebuild)."""
        refs, out_refs = submit(steps, self._workers_of, self.layout.pp - 1)
        values = dict(zip(refs, self._wait(refs, deadline, what), strict=True))
        return [decode(step, ref, values, refs, self._fail) for step, ref in zip(steps, out_refs, strict=True)]

    def _wait(self, refs: dict, deadline: float, what: str) -> list:
        """Results of `refs` (ref -> worker) in order; EngineDeadError on the first failure or at the deadline."""
        return wait_all(refs, deadline, what, f"collective_timeout_s={self.config.collective_timeout_s}", self._fail,
                        lambda: self.closed)

    def _failure(self, workers: list[Worker], cause: str, exc: BaseException | None) -> Failure:
        replica = workers[0].rank.replica
        self.kill_replica(replica)   # ray.kill also ends a rank blocked in a gloo recv or SIGSTOPped
        failure = Failure(replica, f"{_names(workers)} {cause}", time.monotonic(), exc)
        logger.error("replica %d failed: %s", replica, failure.cause)
        return failure

    def die(self, message: str, exc: BaseException | None):
        self.dead = message
        logger.error("engine dead: %s", message)
        raise EngineDeadError(message) from exc

    def _fail(self, workers: list[Worker], cause: str, exc: BaseException | None = None, fatal: bool = False):
        """Kill the failed replicas' workers, raise EngineDeadError: a start-up wait (the caller decides
        whether that ends the executor or uses a restart), or a step that broke the protocol (`fatal`)."""
        for replica in sorted({w.rank.replica for w in workers}):
            self.kill_replica(replica)
        if fatal:
            self.die(f"{_names(workers)} {cause}", exc)
        raise EngineDeadError(f"{_names(workers)} {cause}") from exc

    # ------------------------------------------------------------------ shutdown

    def kill_replica(self, replica: int) -> None:
        # ray.kill stops the process even if it is blocked in a gloo recv from a dead peer
        for w in self._workers_of([replica]):
            quietly(ray.kill, w.actor, no_restart=True)

    def shutdown(self) -> None:
        """Kill every actor, remove every placement group we made, disconnect if we connected. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.recovery.join(timeout_s=5.0)   # rebuild threads notice `closed` within a poll
        if not ray.is_initialized():
            return
        self.standby.shutdown()
        alive = [w for w in self.workers if w is not None]
        if self.dead is None and alive:   # polite first: leave the process groups (bounded)
            quietly(ray.wait, [w.actor.shutdown.remote() for w in alive], num_returns=len(alive), timeout=2.0)
        for w in alive:
            quietly(ray.kill, w.actor, no_restart=True)
        remove_groups(list(self.groups.values()))   # only our own: an ExistingGroup belongs to its owner
        self.workers = [None] * len(self.ranks)
        self.groups = {}
        if self.started_ray:
            ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ helpers

    def _workers_of(self, replicas: list[int]) -> list[Worker]:
        """Workers of these replicas in global-rank order (so local rank 0 comes first)."""
        return [w for w in self.workers if w is not None and w.rank.replica in replicas]

    def _startup_timeout(self) -> float:
        return float(self.config.startup_timeout_s or self.config.collective_timeout_s + 300.0)

    @property
    def node_ids(self) -> dict[tuple[int, int, int], str]:
        """(replica, pp_rank, tp_rank) -> Ray node id, as reported by each worker."""
        return {(w.rank.replica, w.rank.pp_rank, w.rank.tp_rank): w.node_id for w in self.workers if w}


def _names(workers: list[Worker]) -> str:
    return "; ".join(w.describe() for w in workers[:4]) + (" ..." if len(workers) > 4 else "")
