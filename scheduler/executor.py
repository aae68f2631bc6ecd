"""The seam between the engine loop (plain Python) and whatever runs the model.

`cluster.local_executor.LocalExecutor` runs one rank in-process; `cluster.ray_executor.RayExecutor`
runs T x P x D ranks on Ray actors. The engine never knows which.

Recovery, as the engine sees it: a failed `execute` raises `ReplicasFailedError` at once (the
healthy replicas' outputs stand) while the failed replicas are rebuilt in the background;
`ready_replicas` says which replicas may be scheduled, `wait_ready` blocks (bounded) while none
is, and `take_recoveries` reports each finished rebuild - or raises `EngineDeadError` when one
failed past the restart budget.

An executor that also offers `submit`/`collect` (`scheduler.pipelined.AsyncExecutor`: the Ray
executor) lets the pipelined engine keep micro-batches of consecutive steps in flight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from scheduler.wire import StepInput, StepOutput


class EngineDeadError(RuntimeError):
    """The ranks can no longer run steps; the message names the rank, the node and the cause."""


@dataclass(frozen=True)
class ReplicaFailure:
    """One replica that failed a step; the executor has killed its ranks and started a rebuild."""

    replica: int
    cause: str              # names the rank, node, pid and what went wrong
    detected_at: float      # time.monotonic() when the executor saw the failure


@dataclass(frozen=True)
class ReplicaRecovery:
    """One replica that failed a step and was rebuilt (empty KV cache, same placement rules)."""

    replica: int
    cause: str              # names the rank, node, pid and what went wrong
    detected_at: float      # time.monotonic() when the executor saw the failure
    recovered_at: float     # time.monotonic() when the rebuilt replica had finished its warm-up
    restarts_used: int      # restarts so far, this one included (out of EngineConfig.max_restarts)

    @property
    def recovery_s(self) -> float:
        return self.recovered_at - self.detected_at


class ReplicasFailedError(RuntimeError):
    """`execute` lost the micro-batches of some replicas, whose rebuild has started (in the background).

    `outputs` is aligned with the `execute` input: a `StepOutput` for every micro-batch of a
    healthy replica (those results stand), None for those of a failed one. The engine must
    re-queue the failed replicas' sequences for recompute (their new ranks will know nothing) and
    schedule nothing on them until `ready_replicas` has them again.
    """

    def __init__(self, failures: list[ReplicaFailure], outputs: list[StepOutput | None]) -> None:
        super().__init__("; ".join(f"replica {f.replica} failed: {f.cause}" for f in failures))
        self.failures = failures
        self.outputs = outputs

    @property
    def replicas(self) -> set[int]:
        return {f.replica for f in self.failures}


@runtime_checkable
class Executor(Protocol):
    num_replicas: int
    """Data-parallel replicas; each `StepInput.replica` is in range(num_replicas)."""
    num_kv_blocks: int
    """KV-cache blocks each replica holds (the scheduler's block budget per replica)."""
    max_in_flight: int
    """Micro-batches one replica can overlap (its pipeline depth P)."""

    @property
    def ready_replicas(self) -> frozenset[int]:
        """Replicas that take steps now (the others are being rebuilt)."""
        ...

    def execute(self, steps: list[StepInput]) -> list[StepOutput]:
        """Run every micro-batch (of ready replicas only) and return one `StepOutput` per input, same order.

        Micro-batches of one replica run in list order; up to `max_in_flight` overlap in the
        pipeline. If a rank died, raised or missed its deadline, the executor kills that rank's
        replica, starts rebuilding it in the background and raises `ReplicasFailedError` at once
        (other replicas' outputs attached); the replica leaves `ready_replicas` until rebuilt. It
        raises `EngineDeadError` when it cannot (or may not: `max_restarts`) rebuild it.
        """
        ...

    def wait_ready(self, timeout_s: float) -> bool:
        """Block up to `timeout_s` until a replica is ready or a rebuild ended; True if one is ready."""
        ...

    def take_recoveries(self) -> list[ReplicaRecovery]:
        """Rebuilds finished since the last call (oldest first). Raises `EngineDeadError` once a
        rebuild failed past the restart budget."""
        ...

    def shutdown(self) -> None:
        """Release every process and resource the executor created. Safe to call twice."""
        ...


class NeverRebuilds:
    """The recovery half of the protocol for executors that never rebuild (one process, test toys)."""

    num_replicas: int

    @property
    def ready_replicas(self) -> frozenset[int]:
        return frozenset(range(self.num_replicas))

    def wait_ready(self, timeout_s: float) -> bool:
        return True

    def take_recoveries(self) -> list[ReplicaRecovery]:
        return []
