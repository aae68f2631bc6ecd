"""Where every rank lives: the rank grid, placement-group bundles and the resource check.

Pure functions (no Ray, no torch), so every rule here is unit-tested and shown by example.

The grid. Global ranks are `arange(dp * pp * tp).reshape(dp, pp, tp)`; for dp=2, pp=2, tp=2:

    replica 0:  stage 0: g0 g1     replica 1:  stage 0: g4 g5
                stage 1: g2 g3                 stage 1: g6 g7

Each replica is its own torch.distributed world of pp * tp ranks whose replica-local rank is
`pp_rank * tp + tp_rank` (the `arange(pp * tp).reshape(pp, tp)` grid `sharding.dist` expects).

The placement. One placement group per (replica, stage), holding that stage's tp workers, one
bundle each, with strategy STRICT_PACK:

    group 0 = (replica 0, stage 0): bundles [g0, g1]  STRICT_PACK -> one node
    group 1 = (replica 0, stage 1): bundles [g2, g3]  STRICT_PACK -> one node (maybe another)
    group 2 = (replica 1, stage 0): bundles [g4, g5]  ...

so rank g sits in group `g // tp`, bundle `g % tp`.

Why not one group per replica? Ray's strategy applies to a whole group: STRICT_PACK would force
every stage of a replica onto one node (PP could never spread), and PACK is only best effort, so
a TP group could be split across nodes when space is short and every all-reduce (one per layer)
would cross the network. Per-stage groups give the guarantee that matters - a TP group shares a
node - and leave Ray free to put stages and replicas wherever they fit: PP sends one hidden-state
tensor per micro-batch per stage boundary, which can afford to cross nodes. The price is that a
replica's groups are reserved one by one, so the executor waits for each with a deadline and
removes them all on failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PLACEMENT_STRATEGY = "STRICT_PACK"
RESOURCE_QUANTUM = 1e-4  # Ray accounts resources in units of 1/10000


class ResourceError(RuntimeError):
    """The cluster cannot host the requested layout; the message says what is missing."""


@dataclass(frozen=True, slots=True)
class RankInfo:
    """One rank of the global grid and where it is placed."""

    global_rank: int
    replica: int        # dp index
    pp_rank: int        # pipeline stage
    tp_rank: int
    local_rank: int     # rank in its replica's process group: pp_rank * tp + tp_rank
    group_index: int    # its placement group (one per (replica, stage)) in `bundles_for`'s list
    bundle_index: int   # its bundle inside that group (= tp_rank)

    def describe(self) -> str:
        return f"rank (replica={self.replica}, pp={self.pp_rank}, tp={self.tp_rank})"


@dataclass(frozen=True, slots=True)
class Layout:
    """What to place: the parallel sizes and what each worker asks for."""

    tp: int
    pp: int
    dp: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False

    @property
    def num_workers(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"tp={self.tp} x pp={self.pp} x dp={self.dp}"


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """One placement group: the tp workers of one (replica, stage), packed onto one node."""

    replica: int
    pp_rank: int
    bundles: tuple[dict, ...]
    strategy: str = PLACEMENT_STRATEGY


def rank_grid(dp: int, pp: int, tp: int) -> list[RankInfo]:
    """Every rank of a dp x pp x tp layout, in global-rank order.

    >>> [(r.global_rank, r.replica, r.pp_rank, r.tp_rank, r.local_rank) for r in rank_grid(2, 2, 1)]
    [(0, 0, 0, 0, 0), (1, 0, 1, 0, 1), (2, 1, 0, 0, 0), (3, 1, 1, 0, 1)]
    >>> r = rank_grid(1, 2, 2)[3]   # replica 0, stage 1, tp rank 1
    >>> (r.local_rank, r.group_index, r.bundle_index, r.describe())
    (3, 1, 1, 'rank (replica=0, pp=1, tp=1)')
    """
    for name, value in (("dp", dp), ("pp", pp), ("tp", tp)):
        if value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    ranks = []
    for g in range(dp * pp * tp):  # g = (replica * pp + pp_rank) * tp + tp_rank
        replica, rest = divmod(g, pp * tp)
        pp_rank, tp_rank = divmod(rest, tp)
        ranks.append(RankInfo(global_rank=g, replica=replica, pp_rank=pp_rank, tp_rank=tp_rank,
                              local_rank=rest, group_index=g // tp, bundle_index=tp_rank))
    return ranks


def worker_bundle(use_gpu: bool, cpus_per_worker: float) -> dict:
    """The resources one worker reserves.

    >>> worker_bundle(False, 0.5)
    {'CPU': 0.5}
    >>> worker_bundle(True, 1.0)
    {'GPU': 1, 'CPU': 1.0}
    """
    if cpus_per_worker <= 0:
        raise ValueError(f"cpus_per_worker={cpus_per_worker} must be positive (fractions are fine)")
    return {"GPU": 1, "CPU": cpus_per_worker} if use_gpu else {"CPU": cpus_per_worker}


def bundles_for(dp: int, pp: int, tp: int, use_gpu: bool, cpus_per_worker: float) -> list[GroupSpec]:
    """The placement groups of a layout: one per (replica, stage), one bundle per TP rank.

    >>> groups = bundles_for(dp=1, pp=2, tp=2, use_gpu=False, cpus_per_worker=0.5)
    >>> [(g.replica, g.pp_rank, g.bundles, g.strategy) for g in groups]
    [(0, 0, ({'CPU': 0.5}, {'CPU': 0.5}), 'STRICT_PACK'), (0, 1, ({'CPU': 0.5}, {'CPU': 0.5}), 'STRICT_PACK')]
    >>> [g.bundles for g in bundles_for(dp=2, pp=1, tp=1, use_gpu=True, cpus_per_worker=1.0)]
    [({'GPU': 1, 'CPU': 1.0},), ({'GPU': 1, 'CPU': 1.0},)]
    """
    bundle = worker_bundle(use_gpu, cpus_per_worker)
    return [GroupSpec(replica=replica, pp_rank=stage, bundles=tuple(dict(bundle) for _ in range(tp)))
            for replica in range(dp) for stage in range(pp)]


def default_cpu_share(num_workers: int, tp: int, free_cpus: float, largest_node_cpus: float | None = None) -> float:
    """CPUs each worker reserves when the user did not say: as much as fits, at most one.

    min(1, free / workers), also capped so one TP group fits on the largest node, and rounded
    down to Ray's resource unit so the shares never add up to more than what is free.

    >>> default_cpu_share(4, tp=2, free_cpus=2.0)
    0.5
    >>> default_cpu_share(3, tp=1, free_cpus=2.0)   # 2/3 rounded down: 3 x 0.6666 <= 2
    0.6666
    >>> default_cpu_share(2, tp=2, free_cpus=8.0, largest_node_cpus=1.0)
    0.5
    >>> default_cpu_share(1, tp=1, free_cpus=0.0)   # nothing free: ask for the minimum, let the check explain
    0.0001
    """
    share = min(1.0, free_cpus / num_workers)
    if largest_node_cpus is not None:
        share = min(share, largest_node_cpus / tp)
    share = math.floor(share / RESOURCE_QUANTUM + 1e-9) * RESOURCE_QUANTUM
    return round(max(share, RESOURCE_QUANTUM), 4)


def torch_threads_for(cpu_share: float) -> int:
    """Intra-op threads for a worker holding `cpu_share` CPUs: whole cores only, at least one.

    >>> [torch_threads_for(x) for x in (0.25, 1.0, 2.5)]
    [1, 1, 2]
    """
    return max(1, math.floor(cpu_share + 1e-9))


def check_resources(layout: Layout, available: dict, node_totals: list[dict] | None = None) -> None:
    """Raise `ResourceError` unless the cluster has room for every worker of `layout`.

    `available` is `ray.available_resources()`; `node_totals`, if given, holds each alive node's
    total resources, to catch a TP group that is larger than any node (it can never be placed,
    because a TP group must share one node).

    >>> check_resources(Layout(tp=2, pp=2, cpus_per_worker=0.5), {"CPU": 2.0})
    >>> check_resources(Layout(tp=2, pp=2, cpus_per_worker=0.5), {"CPU": 1.0})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    cluster.placement.ResourceError: layout tp=2 x pp=2 x dp=1 needs 4 workers x 0.5 CPU = 2.0 CPU; the cluster has...
    >>> check_resources(Layout(tp=1, pp=1, use_gpu=True), {"CPU": 2.0})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    cluster.placement.ResourceError: layout tp=1 x pp=1 x dp=1 needs 1 workers x 1 GPU = 1 GPU; the cluster has 0 GPU...
    """
    n, share = layout.num_workers, layout.cpus_per_worker
    if layout.use_gpu:
        free_gpu = float(available.get("GPU", 0.0))
        if n > free_gpu + RESOURCE_QUANTUM / 2:
            raise ResourceError(
                f"layout {layout} needs {n} workers x 1 GPU = {n} GPU; the cluster has {free_gpu:g} GPU free. "
                "Run on a cluster with GPUs, or leave use_gpu off to run on CPUs.")
    if node_totals:
        check_fits_a_node(layout, node_totals)
    need_cpu = n * share
    free_cpu = float(available.get("CPU", 0.0))
    if need_cpu > free_cpu + RESOURCE_QUANTUM / 2:
        raise ResourceError(
            f"layout {layout} needs {n} workers x {_num(share)} CPU = {_num(need_cpu)} CPU; the cluster has "
            f"{_num(free_cpu)} CPU free{_largest_tp(free_cpu, share, layout.pp * layout.dp)}. Use fewer workers, "
            "lower cpus_per_worker, or add nodes.")


def check_fits_a_node(layout: Layout, node_totals: list[dict]) -> None:
    """Raise `ResourceError` if no node is big enough for one TP group, even when empty.

    >>> check_fits_a_node(Layout(tp=2, pp=1, cpus_per_worker=1.0), [{"CPU": 1.0}, {"CPU": 1.0}])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    cluster.placement.ResourceError: layout tp=2 x pp=1 x dp=1: a tensor-parallel group must share one node...
    """
    need = worker_bundle(layout.use_gpu, layout.cpus_per_worker)
    for node in node_totals:
        if all(layout.tp * amount <= float(node.get(key, 0.0)) + RESOURCE_QUANTUM / 2 for key, amount in need.items()):
            return
    most = max(float(node.get("CPU", 0.0)) for node in node_totals)
    what = f"{layout.tp} x {_num(layout.cpus_per_worker)} CPU"
    if layout.use_gpu:
        what += f" and {layout.tp} GPU"
        most_gpu = max(float(node.get("GPU", 0.0)) for node in node_totals)
        has = f"the largest node has {_num(most)} CPU and {most_gpu:g} GPU"
    else:
        has = f"the largest node has {_num(most)} CPU"
    raise ResourceError(
        f"layout {layout}: a tensor-parallel group must share one node and needs {what} there; {has}"
        f"{'' if layout.use_gpu else _largest_tp(most, layout.cpus_per_worker, 1)}. Lower tensor_parallel_size "
        "or cpus_per_worker, or add a larger node.")


def _largest_tp(cpus: float, share: float, groups: int) -> str:
    """', so at most tensor_parallel_size=N fits' for `groups` TP groups of `share`-CPU workers in `cpus`."""
    most = math.floor((cpus + RESOURCE_QUANTUM / 2) / share) // groups
    return f", so at most tensor_parallel_size={most} fits" if most >= 1 else ""


def _num(x: float) -> str:
    """1.0 -> '1.0', 0.6666 -> '0.6666', 2 -> '2'."""
    return str(round(x, 4))


# ------------------------------------------------------------------ layer_split="auto"

def stage_memory(stage_nodes: dict[tuple[int, int], str], node_memory: dict[str, float], pp: int
                 ) -> list[float] | None:
    """Memory each pipeline stage may use, from the node its placement group landed on.

    `stage_nodes` maps (replica, stage) to a node id; a node's memory is shared by the groups
    on it, and a stage gets the least it has in any replica (one split serves all replicas).
    None when every group is on one node: then the stages are equal and `split_layers_by_memory`
    is not needed.

    >>> stage_memory({(0, 0): "big", (0, 1): "small"}, {"big": 16e9, "small": 8e9}, pp=2)
    [16000000000.0, 8000000000.0]
    >>> stage_memory({(0, 0): "a", (0, 1): "a"}, {"a": 16e9}, pp=2) is None
    True
    """
    if len(set(stage_nodes.values())) <= 1:
        return None
    sharing = {n: list(stage_nodes.values()).count(n) for n in set(stage_nodes.values())}
    return [min(float(node_memory[n]) / sharing[n] for (_, s), n in stage_nodes.items() if s == stage)
            for stage in range(pp)]


def split_layers_by_memory(layer_bytes: list[int], stage_memory: list[float], first_extra: int = 0,
                           last_extra: int = 0) -> tuple[int, ...]:
    """Contiguous layers per stage that minimise the largest fraction of a stage's memory used.

    Stage 0 also holds `first_extra` bytes (embeddings), the last stage `last_extra` (LM head).
    Every stage gets at least one layer. Exact (dynamic programming over cut points).

    >>> split_layers_by_memory([1] * 10, [2.0, 1.0])       # twice the memory, about twice the layers
    (7, 3)
    >>> split_layers_by_memory([1] * 10, [1.0, 1.0], first_extra=4)   # the embedding weighs 4 layers
    (3, 7)
    """
    n, pp = len(layer_bytes), len(stage_memory)
    if not 1 <= pp <= n:
        raise ValueError(f"cannot split {n} layers into {pp} stages of at least one layer")
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def load(stage: int, lo: int, hi: int) -> float:   # stage holds layers [lo, hi)
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == pp - 1 else 0)
        return (prefix[hi] - prefix[lo] + extra) / stage_memory[stage]

    # best[s][i]: (worst load, cuts) placing layers [0, i) on stages [0, s]
    best = [{i: (load(0, 0, i), (i,)) for i in range(1, n - pp + 2)}]
    for s in range(1, pp):
        row = {}
        for i in range(s + 1, n - pp + s + 2):
            row[i] = min(((max(w, load(s, j, i)), (*cuts, i - j)) for j, (w, cuts) in best[-1].items() if j < i),
                         key=lambda t: t[0])
        best.append(row)
    return best[-1][n][1]
