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

Steps 4-8 take a list of replicas so that one replica can later be rebuilt alone.

Per `execute(steps)`: every `StepInput` is encoded once and sent to every worker of its replica
at once, so up to P micro-batches are in the pipeline together; Ray runs each actor's calls in
submission order, so every rank sees the micro-batches in the same order and the stages' send
and recv pairs match. The sampling rank (last stage, TP rank 0) returns the `StepOutput`; the
other ranks' results are awaited too so that an error anywhere surfaces. Waiting is a
`ray.wait` loop with a deadline: a dead actor or a raised exception becomes `EngineDeadError`
naming the rank, node and cause, and the replica's other workers (possibly blocked in a gloo
recv from the dead one) are killed so nothing hangs.

Options (`EngineConfig` fields, so `LLM(...)` keywords; all optional):
    cpus_per_worker     CPUs each worker reserves (default: min(1, free CPUs / workers))
    use_gpu             ask every worker for one GPU (default: when the cluster has GPUs)
    connect_timeout_s   deadline to reach the cluster at `address` (default 10)
    resource_wait_s     how long a resource shortfall is re-checked before it is an error (default 5)
    placement_timeout_s deadline to reserve the placement groups (default 60)
    startup_timeout_s   deadline for rendezvous + loading + warm-up (default collective_timeout_s + 300)
    step_timeout_s      deadline for one `execute` call (default collective_timeout_s)

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
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.layer_split import plan_for, resolve_layer_split
from cluster.placement import (
    GroupSpec,
    Layout,
    RankInfo,
    ResourceError,
    bundles_for,
    check_resources,
    default_cpu_share,
    rank_grid,
)
from cluster.ray_connect import connect, worker_runtime_env
from cluster.worker import ShardWorker
from scheduler.config import EngineConfig
from scheduler.executor import EngineDeadError
from scheduler.wire import (
    NewSequence,
    ScheduledSequence,
    SeqSampling,
    StepInput,
    StepOutput,
    decode_step_output,
    encode_step_input,
)

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent   # holds cluster/, sharding/, scheduler/
INLINE_LIMIT = 100 * 1024       # bigger step messages go through the object store once, not once per rank
POLL_S = 0.2                    # how often a wait loop looks for failed ranks
DEATH_GRACE_S = 1.0             # after a rank raises, how long to look for a dead peer to blame instead
MAX_CAUSE_CHARS = 300           # of a remote exception's text in EngineDeadError
WARMUP_SEQ_ID = -1              # never a real request's id


class PlacementTimeoutError(ResourceError):
    """A placement group could not be reserved in time (the cluster lacks room where it is needed)."""


@dataclass
class _Worker:
    rank: RankInfo
    actor: ray.actor.ActorHandle
    node_id: str = "?"
    node_ip: str = "?"
    pid: int | None = None

    def describe(self) -> str:
        return f"{self.rank.describe()} on node {self.node_ip} ({self.node_id[:12]}, pid {self.pid})"


class RayExecutor:
    """T x P x D `ShardWorker` actors behind the `Executor` protocol (see the module docstring)."""

    def __init__(self, config: EngineConfig, address: str | None = None) -> None:
        self.config = config
        self.num_replicas = config.data_parallel_size
        self.max_in_flight = config.pipeline_parallel_size
        self.num_kv_blocks = 0
        self.max_model_len = 0
        self.ranks = rank_grid(config.data_parallel_size, config.pipeline_parallel_size, config.tensor_parallel_size)
        self.workers: list[_Worker | None] = [None] * len(self.ranks)   # by global rank
        self.groups: dict[tuple[int, int], PlacementGroup] = {}          # (replica, stage) -> group
        self.worker_info: list[dict] = []                                # what each rank's init returned
        self.layout: Layout | None = None
        self.started_ray = False
        self.name_prefix = f"shardline-{uuid.uuid4().hex[:8]}"
        self._dead: str | None = None
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
        # 3. resources: enough free CPUs/GPUs, with a message that says what is missing
        self.layout = self._check_resources()
        # 4-8. per replica: placement groups, actors, rendezvous + load, warm-up
        self._start_replicas(list(range(self.num_replicas)))
        self.num_kv_blocks = min(info["num_kv_blocks"] for info in self.worker_info)
        logger.info("RayExecutor %s ready in %.1f s: %d workers x %s CPU, %d KV blocks per replica",
                    self.layout, time.perf_counter() - t0, self.layout.num_workers, self.layout.cpus_per_worker,
                    self.num_kv_blocks)

    def _start_replicas(self, replicas: list[int]) -> None:
        # 4. placement groups, bounded wait; layer_split="auto" is sized for the nodes they landed on
        self._reserve_placement_groups(replicas)
        self.config = resolve_layer_split(self.config, self.groups)
        self.plan = plan_for(self.config)
        # 5. one actor per rank, pinned to its bundle
        self._spawn_workers(replicas)
        # 6 + 7. rendezvous on an ephemeral port; each rank loads only its shard
        self._rendezvous_and_load(replicas)
        # 8. warm-up: one tiny step through each pipeline
        self._warm_up(replicas)

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

    def _reserve_placement_groups(self, replicas: list[int]) -> None:
        """Step 4. One STRICT_PACK group per (replica, stage); never wait on Ray forever."""
        lay = self.layout
        specs = [g for g in bundles_for(lay.dp, lay.pp, lay.tp, lay.use_gpu, lay.cpus_per_worker)
                 if g.replica in replicas]
        for spec in specs:
            self.groups[(spec.replica, spec.pp_rank)] = placement_group(
                list(spec.bundles), strategy=spec.strategy,
                name=f"{self.name_prefix}-r{spec.replica}-pp{spec.pp_rank}")
        timeout = float(self.config.placement_timeout_s)
        ready = {self.groups[(s.replica, s.pp_rank)].ready(): s for s in specs}
        done, pending = ray.wait(list(ready), num_returns=len(ready), timeout=timeout)
        if pending:
            raise PlacementTimeoutError(_placement_message(lay, [ready[r] for r in pending], timeout))
        ray.get(done)

    def _spawn_workers(self, replicas: list[int]) -> None:
        """Step 5. One actor per rank in its (replica, stage) group, bundle = tp_rank."""
        lay = self.layout
        remote_cls = ray.remote(ShardWorker)
        runtime_env = worker_runtime_env(REPO_ROOT)
        for rank in self.ranks:
            if rank.replica not in replicas:
                continue
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self.groups[(rank.replica, rank.pp_rank)],
                placement_group_bundle_index=rank.bundle_index, placement_group_capture_child_tasks=False)
            actor = remote_cls.options(
                num_cpus=lay.cpus_per_worker, num_gpus=1 if lay.use_gpu else 0,
                max_concurrency=1, max_restarts=0, max_task_retries=0,
                scheduling_strategy=strategy, runtime_env=runtime_env,
                name=f"{self.name_prefix}-rank{rank.global_rank}",
            ).remote(lay.cpus_per_worker)
            self.workers[rank.global_rank] = _Worker(rank, actor)

    def _rendezvous_and_load(self, replicas: list[int]) -> None:
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
        self.worker_info += self._wait(inits, deadline, "load")

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
        """Run every micro-batch; one `StepOutput` per input, same order (see the module docstring)."""
        if self._dead is not None or self._closed:
            raise EngineDeadError(self._dead or "the executor was shut down")
        bad = [s.replica for s in steps if not 0 <= s.replica < self.num_replicas]
        if bad:
            raise ValueError(f"StepInput.replica={bad[0]} is out of range(num_replicas={self.num_replicas})")
        timeout = float(self.config.step_timeout_s or self.config.collective_timeout_s)
        return self._run(steps, time.monotonic() + timeout, "step")

    def _run(self, steps: list[StepInput], deadline: float, what: str) -> list[StepOutput]:
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
        values = dict(zip(refs, self._wait(refs, deadline, what), strict=True))
        outputs = []
        for step, ref in zip(steps, out_refs, strict=True):
            if values[ref] is None:
                self._fail([refs[ref]], f"returned no StepOutput for step {step.step_id}")
            outputs.append(decode_step_output(values[ref]))
        return outputs

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
        """Name the root cause: a rank whose peer died usually raises first (gloo: connection reset),
        so give the same replica's other calls a moment to report the death, and blame the dead one."""
        if not any(isinstance(e, RayActorError) for e in errors.values()):
            replicas = {refs[r].rank.replica for r in errors}
            peers = [r for r in pending if refs[r].rank.replica in replicas]
            ready, _ = ray.wait(peers, num_returns=len(peers), timeout=DEATH_GRACE_S) if peers else ([], [])
            for ref in ready:
                try:
                    ray.get(ref)
                except RayError as e:
                    errors[ref] = e
        ref, exc = next(((r, e) for r, e in errors.items() if isinstance(e, RayActorError)),
                        next(iter(errors.items())))
        if isinstance(exc, RayActorError):
            cause = f"died during {what}: {_first_line(exc)}"
        elif isinstance(exc, RayTaskError):
            cause = f"raised during {what}: {_cause(exc)}"
        else:
            cause = f"failed during {what}: {_first_line(exc)}"
        others = {refs[r].rank.describe() for r in errors} - {refs[ref].rank.describe()}
        if others:
            cause += f" (then {', '.join(sorted(others))} failed too)"
        self._fail([refs[ref]], cause, exc)

    def _fail(self, workers: list[_Worker], cause: str, exc: BaseException | None = None):
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
            _quietly(ray.kill, w.actor, no_restart=True)

    def shutdown(self) -> None:
        """Kill every actor, remove every placement group we made, disconnect if we connected. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if not ray.is_initialized():
            return
        alive = [w for w in self.workers if w is not None]
        if self._dead is None and alive:   # polite first: leave the process groups (bounded)
            _quietly(ray.wait, [w.actor.shutdown.remote() for w in alive], num_returns=len(alive), timeout=2.0)
        for w in alive:
            _quietly(ray.kill, w.actor, no_restart=True)
        for group in self.groups.values():
            _quietly(remove_placement_group, group)
        _quietly(_wait_removed, list(self.groups.values()), timeout_s=5.0)
        self.workers = [None] * len(self.ranks)
        self.groups = {}
        if self.started_ray:
            ray.shutdown()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ helpers

    def _workers_of(self, replicas: list[int]) -> list[_Worker]:
        """Workers of these replicas in global-rank order (so local rank 0 comes first)."""
        return [w for w in self.workers if w is not None and w.rank.replica in replicas]

    def _startup_timeout(self) -> float:
        return float(self.config.startup_timeout_s or self.config.collective_timeout_s + 300.0)

    @property
    def node_ids(self) -> dict[tuple[int, int, int], str]:
        """(replica, pp_rank, tp_rank) -> Ray node id, as reported by each worker."""
        return {(w.rank.replica, w.rank.pp_rank, w.rank.tp_rank): w.node_id for w in self.workers if w}


def _wait_removed(groups: list[PlacementGroup], timeout_s: float) -> None:
    """Wait (bounded) until Ray reports our placement groups removed, so their CPUs are free again."""
    from ray.util.placement_group import placement_group_table

    ids = {g.id.hex() for g in groups}
    deadline = time.monotonic() + timeout_s
    while ids and time.monotonic() < deadline:
        table = placement_group_table()
        if all(table.get(i, {}).get("state", "REMOVED") == "REMOVED" for i in ids):
            return
        time.sleep(0.05)


def _placement_message(layout: Layout, pending: list[GroupSpec], timeout: float) -> str:
    where = ", ".join(f"(replica {g.replica}, stage {g.pp_rank})" for g in pending)
    bundle = pending[0].bundles[0]
    return (f"layout {layout}: could not reserve the placement group of {where} within {timeout:g} s. Each "
            f"needs {layout.tp} x {bundle} on one node ({pending[0].strategy}); the free resources are spread "
            f"too thin or taken by others (`ray status` shows them). Lower tensor_parallel_size or "
            f"cpus_per_worker, free resources, or add a node.")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:MAX_CAUSE_CHARS] if text else type(e).__name__


def _cause(e: RayTaskError) -> str:
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, RayTaskError):
        return f"{type(cause).__name__}: {str(cause)[:MAX_CAUSE_CHARS]}"
    return _first_line(e)


def _quietly(fn, *args, **kwargs) -> None:
    """Best-effort clean-up: a failure to clean one thing must not stop cleaning the rest."""
    try:
        fn(*args, **kwargs)
    except Exception:   # noqa: BLE001 - clean-up must go on
        logger.debug("clean-up step %s failed", getattr(fn, "__name__", fn), exc_info=True)
