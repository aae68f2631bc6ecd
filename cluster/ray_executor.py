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

Per `execute(steps)`: every `StepInput` is encoded once and sent to every worker of its replica
at once, so up to P micro-batches are in the pipeline together; Ray runs each actor's calls in
submission order, so every rank sees the micro-batches in the same order and the stages' send
and recv pairs match. The sampling rank (last stage, TP rank 0) returns the `StepOutput`; the
other ranks' results are awaited too so that an error anywhere surfaces. Waiting is a
`ray.wait` loop with a deadline (`step_timeout_s`), replica by replica: a dead actor, a raised
exception or a rank still busy at the deadline (hung, SIGSTOPped) fails that replica, named by
rank, node, pid and cause, and its other workers (possibly blocked in a gloo recv from the dead
one) are killed at once so nothing hangs; the other replicas' results are still collected.

Recovery: a failed replica is torn down (actors killed, its own placement groups removed - an
ExistingGroup stays and its bundles are reused) and rebuilt by steps 4-8 (placement waits up to
`placement_timeout_s` for capacity to come back), then `execute` raises
`ReplicasRestartedError` with the healthy replicas' outputs and the engine recomputes the rebuilt
replica's sequences. At most `max_restarts` rebuilds over the executor's life; past it, or if a
rebuild fails, `EngineDeadError` with both causes and the executor is dead. Each failure and
rebuild is logged (rank, cause, time to rebuild and its phases).

Options (`EngineConfig` fields, so `LLM(...)` keywords; all optional):
    cpus_per_worker     CPUs each worker reserves (default: min(1, free CPUs / workers))
    use_gpu             ask every worker for one GPU (default: when the cluster has GPUs)
    connect_timeout_s   deadline to reach the cluster at `address` (default 10)
    resource_wait_s     how long a resource shortfall is re-checked before it is an error (default 5)
    placement_timeout_s deadline to reserve the placement groups (default 60)
    startup_timeout_s   deadline for rendezvous + loading + warm-up (default collective_timeout_s + 300)
    step_timeout_s      deadline for one `execute` call (default collective_timeout_s, 30 s)
    max_restarts        replica rebuilds allowed over the engine's life (default 3; 0: fail-stop)

Clusters: run the driver with `ray job submit --working-dir . --runtime-env-json
'{"excludes": [".venv"]}' -- python ...` so every node imports `cluster`, `sharding` and
`scheduler` from the uploaded directory; locally the workers get the repo root on PYTHONPATH.

Only run on CPU (gloo) so far; the GPU path is the same code with `GPU: 1` per worker.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.exceptions import RayError
from ray.util.placement_group import PlacementGroup

from cluster.layer_split import plan_for, resolve_layer_split
from cluster.placement import Layout, ResourceError, check_resources, default_cpu_share, rank_grid
from cluster.ray_connect import connect, worker_runtime_env
from cluster.ray_failures import describe_failure, gather_peer_errors
from cluster.ray_workers import (
    ExistingGroup,
    PlacementTimeoutError,
    Worker,
    quietly,
    remove_groups,
    reserve_placement_groups,
    spawn_worker,
    strategy_for,
)
from scheduler.config import EngineConfig
from scheduler.executor import EngineDeadError, ReplicaRecovery, ReplicasRestartedError
from scheduler.wire import (
    NewSequence,
    ScheduledSequence,
    SeqSampling,
    StepInput,
    StepOutput,
    decode_step_output,
    encode_step_input,
)

__all__ = ["ExistingGroup", "PlacementTimeoutError", "RayExecutor"]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent   # holds cluster/, sharding/, scheduler/
INLINE_LIMIT = 100 * 1024       # bigger step messages go through the object store once, not once per rank
POLL_S = 0.2                    # how often a wait loop looks for failed ranks
WARMUP_SEQ_ID = -1              # never a real request's id


@dataclass
class Failure:
    """A replica that failed a step: the cause names the rank(s), node and pid."""

    replica: int
    cause: str
    detected_at: float                  # time.monotonic()
    exc: BaseException | None


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
        self._dead: str | None = None
        self.restarts = 0                                                # replica rebuilds so far
        self.start_phases_s: dict[str, float] = {}                       # of the last (re)start, for logs
        self._closed = False
        try:
            self._start(address)
        except BaseException:
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
        # 4-8. per replica: placement groups, actors, rendezvous + load, warm-up
        self.worker_info = self._start_replicas(list(range(self.num_replicas)))
        self.num_kv_blocks = min(info["num_kv_blocks"] for info in self.worker_info)
        logger.info("RayExecutor %s ready in %.1f s: %d workers x %s CPU, %d KV blocks per replica",
                    self.layout, time.perf_counter() - t0, self.layout.num_workers, self.layout.cpus_per_worker,
                    self.num_kv_blocks)

    def _start_replicas(self, replicas: list[int]) -> list[dict]:
        t = [time.monotonic()]
        # 4. placement groups, bounded wait (unless the workers go into an existing group);
        #    layer_split="auto" is then sized for the nodes the groups landed on
        if self.placement is None:
            timeout = float(self.config.placement_timeout_s)
            self.groups.update(reserve_placement_groups(self.layout, replicas, self.name_prefix, timeout))
        self.config = resolve_layer_split(self.config, self.groups)
        self.plan = plan_for(self.config)
        t.append(time.monotonic())
        # 5. one actor per rank, pinned to its bundle
        self._spawn_workers(replicas)
        # 6 + 7. rendezvous on an ephemeral port; each rank loads only its shard
        infos = self._rendezvous_and_load(replicas)
        t.append(time.monotonic())
        # 8. warm-up: one tiny step through each pipeline
        self._warm_up(replicas)
        t.append(time.monotonic())
        self.start_phases_s = {"placement": t[1] - t[0], "actors+load": t[2] - t[1], "warm-up": t[3] - t[2]}
        return infos

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
        runtime_env = worker_runtime_env(REPO_ROOT)
        for rank in self.ranks:
            if rank.replica in replicas:
                strategy = strategy_for(rank, self.groups, self.placement)
                self.workers[rank.global_rank] = spawn_worker(rank, self.layout, strategy, runtime_env,
                                                              f"{self.name_prefix}-rank{rank.global_rank}")

    def _rendezvous_and_load(self, replicas: list[int]) -> list[dict]:
        """Steps 6-7. Every rank of a replica calls init together; all replicas load in parallel."""
        cfg = self.config
        deadline = time.monotonic() + self._startup_timeout()
        # where every worker runs (also proves each actor started)
        where = {w.actor.where.remote(): w for w in self._workers_of(replicas)}
        for w, info in zip(where.values(), self._wait(where, deadline, "start"), strict=True):
            w.node_id, w.node_ip, w.pid = info["node_id"], info["node_ip"], info["pid"]
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
        """Run every micro-batch; one `StepOutput` per input, same order (see the module docstring).

        A replica whose rank died, raised or missed the step deadline is rebuilt and
        `ReplicasRestartedError` carries the other replicas' outputs (see "Recovery" above).
        """
        if self._dead is not None or self._closed:
            raise EngineDeadError(self._dead or "the executor was shut down")
        bad = [s.replica for s in steps if not 0 <= s.replica < self.num_replicas]
        if bad:
            raise ValueError(f"StepInput.replica={bad[0]} is out of range(num_replicas={self.num_replicas})")
        values, refs, out_refs = self._submit(steps)
        failures = self._collect(refs, values, time.monotonic() + self.step_timeout_s, "step")
        outputs = [None if step.replica in failures else self._decode(step, ref, values, refs)
                   for step, ref in zip(steps, out_refs, strict=True)]
        if failures:
            raise ReplicasRestartedError(self._recover(failures), outputs)
        return outputs

    @property
    def step_timeout_s(self) -> float:
        return float(self.config.step_timeout_s or self.config.collective_timeout_s)

    def _run(self, steps: list[StepInput], deadline: float, what: str) -> list[StepOutput]:
        """Start-up steps (warm-up): any failure is fatal."""
        _, refs, out_refs = self._submit(steps)
        values = dict(zip(refs, self._wait(refs, deadline, what), strict=True))
        return [self._decode(step, ref, values, refs) for step, ref in zip(steps, out_refs, strict=True)]

    def _submit(self, steps: list[StepInput]) -> tuple[dict, dict, list]:
        refs: dict = {}      # every rank's result ref -> its worker, submission order
        out_refs = []        # per step: the sampling rank's ref
        for step in steps:
            data = encode_step_input(step)
            payload = ray.put(data) if len(data) > INLINE_LIMIT else data
            sampler_ref = None
            for w in self._workers_of([step.replica]):
                ref = w.actor.execute.remote(payload)
                refs[ref] = w
                if w.rank.pp_rank == self.layout.pp - 1 and w.rank.tp_rank == 0:
                    sampler_ref = ref
            out_refs.append(sampler_ref)
        return {}, refs, out_refs

    def _decode(self, step: StepInput, ref, values: dict, refs: dict) -> StepOutput:
        if values[ref] is None:
            self._fail([refs[ref]], f"returned no StepOutput for step {step.step_id}")
        return decode_step_output(values[ref])

    def _collect(self, refs: dict, values: dict, deadline: float, what: str) -> dict[int, Failure]:
        """Wait for `refs` (ref -> worker) into `values`, replica by replica: a replica whose rank dies,
        raises or is still busy at the deadline gets a `Failure` (its workers are killed at once, so
        none stays blocked in a collective); the other replicas' results are still collected."""
        failures: dict[int, Failure] = {}
        pending = list(refs)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for replica in sorted({refs[r].rank.replica for r in pending}):
                    late = [refs[r] for r in pending if refs[r].rank.replica == replica]
                    failures[replica] = self._failure(late, f"did not finish {what} before its deadline "
                                                            f"(step_timeout_s={self.step_timeout_s:g}): "
                                                            f"hung or stopped", None)
                break
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(remaining, POLL_S))
            try:
                values.update(zip(ready, ray.get(ready), strict=True))   # one call in the common case
                continue
            except RayError:
                pass
            errors = {}
            for ref in ready:
                try:
                    values[ref] = ray.get(ref)
                except RayError as e:
                    errors[ref] = e
            gather_peer_errors(errors, pending, refs)
            for replica in sorted({refs[r].rank.replica for r in errors}):
                mine = {r: e for r, e in errors.items() if refs[r].rank.replica == replica}
                ref, cause = describe_failure(mine, refs, what)
                failures[replica] = self._failure([refs[ref]], cause, mine[ref])
            pending = [r for r in pending if refs[r].rank.replica not in failures]
        return failures

    def _failure(self, workers: list[Worker], cause: str, exc: BaseException | None) -> Failure:
        names = "; ".join(w.describe() for w in workers[:4]) + (" ..." if len(workers) > 4 else "")
        replica = workers[0].rank.replica
        self._kill_replica(replica)   # ray.kill also ends a rank blocked in a gloo recv or SIGSTOPped
        failure = Failure(replica, f"{names} {cause}", time.monotonic(), exc)
        logger.error("replica %d failed: %s", replica, failure.cause)
        return failure

    # ------------------------------------------------------------------ recovery

    def _recover(self, failures: dict[int, Failure]) -> list[ReplicaRecovery]:
        """Rebuild the failed replicas (new placement groups, actors, process groups, weights). Every
        attempt uses one restart per replica, so a rank that fails during its own rebuild is tried
        again while the budget lasts; past `max_restarts`, or when the budget runs out on a failed
        rebuild, the executor is dead."""
        budget = self.config.max_restarts
        first = next(iter(failures.values()))
        replicas = sorted(failures)
        while True:
            if self.restarts + len(replicas) > budget:
                self._die(f"{first.cause}; not rebuilt: the restart budget is used up (max_restarts={budget}, "
                          f"{self.restarts} used)", first.exc)
            self.restarts += len(replicas)
            self._release_replicas(replicas)
            try:
                infos = self._start_replicas(replicas)
                break
            except BaseException as e:   # noqa: BLE001 - a failed rebuild is retried, or ends the engine
                self._dead = None        # a failed start-up wait marks the executor dead; the budget decides
                self._release_replicas(replicas)
                if self.restarts + len(replicas) > budget:
                    self._die(f"{first.cause}; the rebuild of replica(s) {replicas} failed: {e}", e)
                logger.error("the rebuild of replica(s) %s failed (%s); trying again", replicas, e)
        blocks = min(info["num_kv_blocks"] for info in infos)
        if blocks < self.num_kv_blocks:
            self._die(f"{first.cause}; the rebuilt replica(s) {replicas} hold {blocks} KV blocks, fewer than the "
                      f"{self.num_kv_blocks} the scheduler plans with", None)
        done = time.monotonic()
        recoveries = [ReplicaRecovery(r, failures[r].cause, failures[r].detected_at, done, self.restarts)
                      for r in replicas]
        for rec in recoveries:
            logger.warning("replica %d rebuilt: detected -> serving again in %.2f s (%d of max_restarts=%d used; %s)",
                           rec.replica, rec.recovery_s, self.restarts, budget,
                           ", ".join(f"{k} {v:.2f} s" for k, v in self.start_phases_s.items()))
        return recoveries

    def _release_replicas(self, replicas: list[int]) -> None:
        """Kill the replicas' actors and remove their own placement groups (an ExistingGroup stays)."""
        for r in replicas:
            self._kill_replica(r)
        for rank in self.ranks:
            if rank.replica in replicas:
                self.workers[rank.global_rank] = None
        groups = [g for (r, _), g in self.groups.items() if r in replicas]
        self.groups = {k: g for k, g in self.groups.items() if k[0] not in replicas}
        remove_groups(groups)

    def _die(self, message: str, exc: BaseException | None):
        self._dead = message
        logger.error("engine dead: %s", message)
        raise EngineDeadError(message) from exc

    def _wait(self, refs: dict, deadline: float, what: str) -> list:
        """Results of `refs` (ref -> worker) in order; EngineDeadError on the first failure or at the deadline."""
        values = {}
        pending = list(refs)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = [refs[r] for r in pending]
                self._fail(late, f"did not finish {what} before its deadline "
                                 f"(collective_timeout_s={self.config.collective_timeout_s})")
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=min(remaining, POLL_S))
            try:
                values.update(zip(ready, ray.get(ready), strict=True))   # one call in the common case
            except RayError:
                errors = {}
                for ref in ready:   # find the rank that failed, to name it
                    try:
                        values[ref] = ray.get(ref)
                    except RayError as e:
                        errors[ref] = e
                self._fail_on_errors(errors, pending, refs, what)
        return [values[r] for r in refs]

    def _fail_on_errors(self, errors: dict, pending: list, refs: dict, what: str):
        """Name the root cause (a dead peer rather than the rank whose recv it broke) and fail."""
        gather_peer_errors(errors, pending, refs)
        ref, cause = describe_failure(errors, refs, what)
        self._fail([refs[ref]], cause, errors[ref])

    def _fail(self, workers: list[Worker], cause: str, exc: BaseException | None = None):
        """Mark the executor dead, kill the failed replicas' workers, raise EngineDeadError."""
        names = "; ".join(w.describe() for w in workers[:4]) + (" ..." if len(workers) > 4 else "")
        self._dead = f"{names} {cause}"
        for replica in sorted({w.rank.replica for w in workers}):
            self._kill_replica(replica)
        raise EngineDeadError(self._dead) from exc

    # ------------------------------------------------------------------ shutdown

    def _kill_replica(self, replica: int) -> None:
        # ray.kill stops the process even if it is blocked in a gloo recv from a dead peer
        for w in self._workers_of([replica]):
            quietly(ray.kill, w.actor, no_restart=True)

    def shutdown(self) -> None:
        """Kill every actor, remove every placement group we made, disconnect if we connected. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not ray.is_initialized():
            return
        alive = [w for w in self.workers if w is not None]
        if self._dead is None and alive:   # polite first: leave the process groups (bounded)
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
