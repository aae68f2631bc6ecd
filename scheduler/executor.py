"""The seam between the engine loop (plain Python) and whatever runs the model.

`cluster.local_executor.LocalExecutor` runs one rank in-process; `cluster.ray_executor.RayExecutor`
runs T x P x D ranks on Ray actors. The engine never knows which.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from scheduler.wire import StepInput, StepOutput


class EngineDeadError(RuntimeError):
    """The ranks can no longer run steps; the message names the rank, the node and the cause."""


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
        pipeline. Raises `EngineDeadError` if a rank died or missed its deadline.
        """
        ...

    def shutdown(self) -> None:
        """Release every process and resource the executor created. Safe to call twice."""
        ...
