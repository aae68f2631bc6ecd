"""One rank in this process, no Ray: the same engine loop, for debugging and small models.

Every step still goes through the msgpack codec (StepInput bytes in, StepOutput bytes out), so
the wire is exercised exactly as with remote workers.
"""

from __future__ import annotations

from scheduler.config import EngineConfig
from scheduler.executor import EngineDeadError, NeverRebuilds
from scheduler.wire import StepInput, StepOutput, decode_step_output, encode_step_input
from sharding.dist import init_single_rank
from sharding.runner import ModelRunner


class LocalExecutor(NeverRebuilds):
    """`Executor` over a single in-process `ModelRunner` (T = P = D = 1)."""

    def __init__(self, config: EngineConfig) -> None:
        if config.world_size * config.data_parallel_size != 1:
            raise ValueError(f"LocalExecutor runs one rank; tp={config.tensor_parallel_size} "
                             f"pp={config.pipeline_parallel_size} dp={config.data_parallel_size} needs RayExecutor")
        self.config = config
        self.groups = init_single_rank()
        self.runner = ModelRunner(config, self.groups)
        self.plan = self.runner.plan
        self.num_replicas = 1
        self.max_in_flight = 1
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.max_model_len = self.runner.max_model_len

    def execute(self, steps: list[StepInput]) -> list[StepOutput]:
        if self.runner is None:
            raise EngineDeadError("LocalExecutor was shut down")
        outs = []
        for step in steps:
            data = self.runner.execute_bytes(encode_step_input(step))
            if data is None:
                raise EngineDeadError(f"rank 0 returned no StepOutput for step {step.step_id}")
            outs.append(decode_step_output(data))
        return outs

    def shutdown(self) -> None:
        if self.runner is not None:
            self.groups.destroy()
            self.runner = None
