"""Process groups of one replica, and the one place that picks device and collective backend.

A replica of T x P ranks uses the rank grid `arange(P * T).reshape(P, T)`: row p is stage p's
TP group, column t is TP rank t's PP group. For T=2, P=2:

    rank grid      TP groups        PP groups
    [[0, 1],       [0, 1], [2, 3]   [0, 2], [1, 3]
     [2, 3]]

so rank 3 is (pp_rank=1, tp_rank=1); it all-reduces with rank 2 and receives hidden states from
rank 1. Data-parallel replicas are separate worlds (each its own rendezvous), so the grid of the
whole cluster is `arange(D * P * T).reshape(D, P, T)` and this module only ever sees one row.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


def select_device(local_rank: int = 0, force_cpu: bool = False) -> tuple[torch.device, str]:
    """CUDA + NCCL when this process has a GPU (and `force_cpu` is off), else CPU + gloo. Nothing else picks either.

    Only the CPU + gloo branch has been run so far (see README). `force_cpu` lets the gloo tests
    test gloo even on a machine with GPUs.
    """
    if torch.cuda.is_available() and not force_cpu:
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index), "nccl"
    return torch.device("cpu"), "gloo"


def free_port(host: str = "") -> int:
    """An ephemeral TCP port the OS says is free right now (for a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class ParallelGroups:
    """This rank's place in its replica and the groups it talks to."""

    rank: int
    tp_size: int
    pp_size: int
    device: torch.device
    backend: str
    tp_group: object | None = None   # None when tp_size == 1: no TP collectives at all
    initialized: bool = False         # True when we called init_process_group

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_driver(self) -> bool:
        """The rank that samples and returns `StepOutput`: last stage, TP rank 0."""
        return self.is_last_stage and self.tp_rank == 0

    @property
    def prev_stage_rank(self) -> int:
        """Global rank of the same TP rank one stage earlier (where hidden states come from)."""
        return self.rank - self.tp_size

    @property
    def next_stage_rank(self) -> int:
        return self.rank + self.tp_size

    def destroy(self) -> None:
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()
        self.initialized = False


def tp_group_ranks(tp: int, pp: int) -> list[list[int]]:
    """Ranks of each stage's TP group, from the replica's grid `arange(pp * tp).reshape(pp, tp)`.

    >>> tp_group_ranks(tp=2, pp=2)
    [[0, 1], [2, 3]]
    >>> tp_group_ranks(tp=3, pp=1)
    [[0, 1, 2]]
    """
    return torch.arange(pp * tp).reshape(pp, tp).tolist()


def init_single_rank(device: torch.device | None = None) -> ParallelGroups:
    """One rank, no torch.distributed at all (the in-process executor and unit tests)."""
    dev, backend = select_device() if device is None else (device, "none")
    return ParallelGroups(rank=0, tp_size=1, pp_size=1, device=dev, backend=backend)


def init_replica(rank: int, tp: int, pp: int, master_addr: str, master_port: int,
                 timeout_s: float = 120.0, local_rank: int = 0, force_cpu: bool = False) -> ParallelGroups:
    """Join one replica's world (T x P ranks) and build its TP groups.

    Every rank of the replica must call this with the same (tp, pp, master_addr, master_port).
    `timeout_s` bounds the rendezvous and every later collective, so a dead peer raises instead
    of hanging this rank forever.
    """
    device, backend = select_device(local_rank, force_cpu)
    world = tp * pp
    if world == 1:
        return ParallelGroups(rank=0, tp_size=1, pp_size=1, device=device, backend=backend)
    dist.init_process_group(backend=backend, init_method=f"tcp://{master_addr}:{master_port}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    tp_group = None
    for stage, ranks in enumerate(tp_group_ranks(tp, pp)):
        # every rank must create every group, in the same order
        group = dist.new_group(ranks, timeout=timedelta(seconds=timeout_s)) if tp > 1 else None
        if stage == rank // tp:
            tp_group = group
    return ParallelGroups(rank=rank, tp_size=tp, pp_size=pp, device=device, backend=backend,
                          tp_group=tp_group, initialized=True)


# Collectives. Each takes its group explicitly and is a no-op for a group of one, so the
# single-rank path never touches torch.distributed.

# gloo's all-reduce has a high fixed cost on small tensors (2 CPU ranks: ~1.5 ms for 1x576
# floats, against ~0.35 ms for an all-gather of the same tensor); below this many elements an
# all-gather plus a local sum in rank order is faster and gives every rank identical bits.
_GLOO_GATHER_REDUCE_MAX_NUMEL = 64 * 1024


def tp_all_reduce(x: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Sum over the TP group; returns the result (use the return value, not `x`)."""
    if groups.tp_size == 1:
        return x
    if groups.backend == "gloo" and x.numel() <= _GLOO_GATHER_REDUCE_MAX_NUMEL:
        parts = [torch.empty_like(x) for _ in range(groups.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=groups.tp_group)
        return torch.stack(parts).sum(0)
    dist.all_reduce(x, group=groups.tp_group)
    return x


def tp_all_gather_last_dim(x: torch.Tensor, groups: ParallelGroups, sizes: tuple[int, ...] | None = None
                           ) -> torch.Tensor:
    """[..., sizes[r]] on TP rank r -> [..., sum(sizes)] in TP-rank order on every rank.

    gloo's all_gather needs equal shapes, so unequal shards are padded to the largest and
    trimmed after. `sizes` None means every rank has x's size.
    """
    if groups.tp_size == 1:
        return x
    width = max(sizes) if sizes else x.shape[-1]
    padded = x if x.shape[-1] == width else torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    parts = [torch.empty_like(padded) for _ in range(groups.tp_size)]
    dist.all_gather(parts, padded.contiguous(), group=groups.tp_group)
    if sizes:
        parts = [p[..., :n] for p, n in zip(parts, sizes, strict=True)]
    return torch.cat(parts, dim=-1)


def pp_send(x: torch.Tensor, groups: ParallelGroups) -> None:
    """Hidden states to the same TP rank of the next stage (point to point, never via Ray)."""
    dist.send(x.contiguous(), dst=groups.next_stage_rank)


def pp_recv(shape: tuple[int, ...], dtype: torch.dtype, groups: ParallelGroups) -> torch.Tensor:
    buf = torch.empty(shape, dtype=dtype, device=groups.device)
    dist.recv(buf, src=groups.prev_stage_rank)
    return buf
