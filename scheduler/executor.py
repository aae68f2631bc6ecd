"""The seam between the engine loop (plain Python) and whatever runs the model.

`cluster.local_executor.LocalExecutor` runs one rank in-process; `cluster.ray_executor.RayExecutor`
runs T x P x D ranks on Ray actors. The engine never knows which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from scheduler.wire import StepInput, StepOutput


class EngineDeadError(RuntimeError):
    """The ranks can no longer run steps; the message names the rank, the node and the cause."""


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


class ReplicasRestartedError(RuntimeError):
    """`execute` lost the micro-batches of some replicas, which it has since rebuilt.

    `outputs` is aligned with the `execute` input: a `StepOutput` for every micro-batch of a
    healthy replica (those results stand), None for those of a rebuilt one. The engine must
    re-queue the rebuilt replicas' sequences for recompute: their new ranks know nothing.
    """

    def __init__(self, recoveries: list[ReplicaRecovery], outputs: list[StepOutput | None]) -> None:
        super().__init__("; ".join(f"replica {r.replica} rebuilt after: {r.cause}" for r in recoveries))
        self.recoveries = recoveries
        self.outputs = outputs

    @property
    def replicas(self) -> set[int]:
        return {r.replica for r in self.recoveries}


@runtime_checkable
class Executor(Protocol):
    num_replicas: int
    """Data-parallel replicas; each `StepInput.replica` is in range(num_replicas)."""
    num_kv_blocks: int
    """KV-cache blocks each replica holds (the scheduler's block budget per replica)."""
    max_in_flight: int
    """Micro-batches one replica can overlap (its pipeline depth P)."""

    def execute(self, steps: list[StepInput]) -> list[StepOutput]:
        """Run every micro-batch (of any replicas) and return one `StepOutput` per input, same order.

        Micro-batches of one replica run in list order; up to `max_in_flight` overlap in the
        pipeline. If a rank died, raised or missed its deadline, the executor may rebuild that
        rank's replica and raise `ReplicasRestartedError` (other replicas' outputs attached);
        it raises `EngineDeadError` when it cannot (or may not: `max_restarts`) rebuild it.
        """
        ...

    def shutdown(self) -> None:
        """Release every process and resource the executor created. Safe to call twice."""
        ...
