"""`ShardWorker`: the Ray actor that hosts one rank (one (replica, pp_rank, tp_rank)).

A plain class; `cluster.ray_executor` turns it into an actor with `ray.remote(ShardWorker).options(...)`
so the resources, placement and runtime environment are decided in one place. The executor keeps
`max_concurrency=1`: Ray then runs one actor's calls one at a time in submission order, and that
order - the same on every rank of a replica - is what makes the pipeline's send/recv pairs match.

The worker holds weights and KV cache only; every request's state lives in the scheduler, so a
replica's workers can be killed and rebuilt at any time.

Only run on CPU so far; on a GPU node the executor asks for `GPU: 1` and Ray narrows
`CUDA_VISIBLE_DEVICES` to it, and `sharding.dist.select_device()` (the only place that picks a
device) takes it with NCCL.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import ray
import torch

from cluster.placement import torch_threads_for

STANDBY_NICE = 10   # a standby imports at a lower CPU priority, so it does not slow the ranks that serve


class ShardWorker:
    """One rank: joins its replica's process group, loads its shard, runs steps."""

    def __init__(self, cpu_share: float, standby: bool = False) -> None:
        # Linux keeps a nice value per thread: Ray renices a worker's main thread (RAY_worker_niceness)
        # after its own threads started. A standby lowers every thread's priority until `init` takes it
        # into service (cluster/ray_standby.py) and then restores each one's.
        self.priorities = _priorities() if standby else {}
        for tid, nice in self.priorities.items():
            _renice(tid, min(19, nice + STANDBY_NICE))
        self.num_threads = torch_threads_for(cpu_share)
        torch.set_num_threads(self.num_threads)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.pid = os.getpid()
        self.groups = None   # sharding.dist.ParallelGroups, after init
        self.runner = None   # sharding.runner.ModelRunner, after init
        self.num_steps = 0
        self.fault: tuple[str, int] | None = None   # test hook, see inject_fault

    def where(self) -> dict:
        """Where this rank runs (for placement checks and error messages)."""
        return {"node_id": self.node_id, "node_ip": self.node_ip, "pid": self.pid, "num_threads": self.num_threads}

    def prepare(self, model: str) -> dict:
        """Import what `init` needs ahead of time - the model code, and the transformers config class of
        `model` (a lazy import of ~3 s) - so a standby rank (`cluster.ray_standby`) starts its
        rendezvous and load the moment a rebuild asks."""
        import sharding.dist  # noqa: F401
        from sharding.plan import load_hf_config
        from sharding.runner import ModelRunner  # noqa: F401

        load_hf_config(model)
        return self.where()

    def get_address(self) -> tuple[str, int]:
        """(node ip, a free port) for the replica's rendezvous; asked of local rank 0 only."""
        from sharding.dist import free_port

        return self.node_ip, free_port(self.node_ip)

    def init(self, config, rank: int, master_addr: str, master_port: int) -> dict:
        """Join the replica's process group, build this rank's stage and load only its shard.

        Every rank of the replica calls this at the same time (the rendezvous waits for all of
        them, at most `config.collective_timeout_s`). Returns what the executor needs (KV blocks,
        where the rank runs) and how long each part took, in seconds.
        """
        t0 = time.perf_counter()
        if self.priorities:   # a standby taken into service; threads started since then get the main thread's
            main = self.priorities.get(self.pid, 0)
            for tid in _priorities():
                _renice(tid, self.priorities.get(tid, main))
            self.priorities = {}
        from sharding.dist import init_replica
        from sharding.runner import ModelRunner

        t1 = time.perf_counter()
        self.groups = init_replica(rank, config.tensor_parallel_size, config.pipeline_parallel_size,
                                   master_addr, master_port, timeout_s=config.collective_timeout_s)
        t2 = time.perf_counter()
        self.runner = ModelRunner(config, self.groups)
        t3 = time.perf_counter()
        return {"rank": rank, "num_kv_blocks": self.runner.num_kv_blocks, "loaded_bytes": self.runner.loaded_bytes,
                "device": str(self.groups.device), "backend": self.groups.backend, "quant": self.runner.quant_report,
                "seconds": {"import": t1 - t0, "rendezvous": t2 - t1, "load": t3 - t2}, **self.where()}

    def execute(self, step_bytes: bytes) -> bytes | None:
        """Run one micro-batch (msgpack `StepInput`); the `StepOutput` bytes on the sampling rank, else None."""
        self.num_steps += 1
        if self.fault is not None and self.num_steps >= self.fault[1]:
            self._fire_fault(self.fault[0])
        return self.runner.execute_bytes(step_bytes)

    # -- deterministic fault injection (tests and benchmarks/soak.py only) --------------------

    FAULTS = ("raise", "exit", "stop", "exit_in_recv")

    def inject_fault(self, kind: str, after_steps: int) -> None:
        """Fail this rank at its `after_steps`-th `execute` call from now: "raise" (the forward raises),
        "exit" (the process dies), "stop" (SIGSTOP: the rank hangs), "exit_in_recv" (dies after
        posting its pipeline recv). One shot: a rebuilt rank is a new process without it."""
        if kind not in self.FAULTS or after_steps < 1:
            raise ValueError(f"inject_fault(kind={kind!r}, after_steps={after_steps!r}): kind must be one of "
                             f"{self.FAULTS} and after_steps >= 1")
        self.fault = (kind, self.num_steps + after_steps)

    def _fire_fault(self, kind: str) -> None:
        self.fault = None
        if kind == "raise":
            raise RuntimeError(f"injected fault: the forward failed at step {self.num_steps}")
        if kind == "exit":
            os._exit(1)
        if kind == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        import torch.distributed as dist

        import sharding.runner

        def recv_then_die(shape, dtype, groups):
            dist.irecv(torch.empty(shape, dtype=dtype, device=groups.device), src=groups.prev_stage_rank)
            os._exit(1)

        sharding.runner.pp_recv = recv_then_die

    def ping(self) -> dict:
        return self.where()

    def shutdown(self) -> None:
        """Leave the process group; the executor kills the process right after."""
        self.runner = None
        if self.groups is not None:
            self.groups.destroy()
            self.groups = None


def _priorities() -> dict[int, int]:
    """{thread id: nice} of this process's threads."""
    tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [os.getpid()]
    return {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in tids}


def _renice(tid: int, nice: int) -> None:
    """Raising a priority back needs CAP_SYS_NICE or RLIMIT_NICE room; without them the thread keeps
    the standby's lower one (logged)."""
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
    except ProcessLookupError:   # the thread ended meanwhile
        pass
    except PermissionError as e:
        logging.getLogger(__name__).warning("could not set thread %d's CPU priority to nice %d: %s", tid, nice, e)
