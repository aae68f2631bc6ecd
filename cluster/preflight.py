"""Pre-flight: prove a cluster can run a T x P layout before anything heavy starts.

    shardline preflight --model DIR --tensor-parallel-size T --pipeline-parallel-size P [--address A]

1 reserve   the layout's placement groups, as the executor would (one STRICT_PACK group per stage)
2 probe     one small `_RankProbe` actor per rank, in its bundle; all start in parallel
3 nodes     on one probe per node: Python, Ray, torch and Shardline versions (equal to the
            driver's), the model folder (every file there, readable, with the driver's sizes),
            device and backend, free memory for that node's shards, the network interface the
            collectives will use (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, else the node address's)
4 wire      the probes form the replica's process group: an all-reduce in every TP group and a
            send/recv between consecutive stages, within the timeout
5 report    one row per node; the first broken node and what to change

Every wait has a deadline (`timeout_s`), so a node that never answers or a collective that
hangs (the usual symptom of a wrong interface) fails the check instead of the engine. One
replica's layout is checked (data-parallel replicas repeat it); the engine reserves its own
placement groups afterwards, so on a busy cluster it may land on other nodes than the probes.

The node-side half (what a node reports, the probe actor, the testing hook) is
`cluster/preflight_probe.py`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.placement import Layout, ResourceError, bundles_for, check_resources, default_cpu_share, rank_grid
from cluster.preflight_probe import REPO_ROOT, _RankProbe, local_versions, model_files
from cluster.ray_workers import remove_groups

MEMORY_HEADROOM = 1.2     # weights plus room for activations and the KV cache's smallest share
RESOURCE_WAIT_S = 5.0     # as the executor: how long a resource shortfall is re-checked


class PreflightError(RuntimeError):
    """The cluster failed pre-flight; the message names the first broken node and what to change."""


@dataclass
class NodeRow:
    """What one node reported, and what is wrong with it."""

    node_ip: str
    node_id: str
    ranks: list[str]
    facts: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class PreflightResult:
    rows: list[NodeRow]
    problems: list[str]          # problems not tied to one node (resources, placement)
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for r in self.rows)

    def first_problem(self) -> str:
        if self.problems:
            return self.problems[0]
        row = next(r for r in self.rows if not r.ok)
        return f"node {row.node_ip} ({row.node_id[:12]}): {row.problems[0]}"

    def table(self) -> str:
        head = ("node", "ranks", "python", "ray", "torch", "shardline", "model", "device", "free/need GiB",
                "iface", "collectives", "status")
        lines = [head]
        for r in self.rows:
            f = r.facts
            mem = f"{f.get('free_gib', '?')}/{f.get('need_gib', '?')}"
            lines.append((f"{r.node_ip} {r.node_id[:8]}", ",".join(r.ranks), f.get("python", "?"), f.get("ray", "?"),
                          f.get("torch", "?"), f.get("shardline", "?"), f.get("model", "?"), f.get("device", "?"),
                          mem, f.get("iface", "?"), f.get("collectives", "?"),
                          "OK" if r.ok else "FAIL: " + "; ".join(r.problems)))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head) - 1)]
        out = []
        for line in lines:
            cells = [str(c).ljust(w) for c, w in zip(line[:-1], widths)] + [str(line[-1])]
            out.append("  ".join(cells))
        out += [f"cluster: {p}" for p in self.problems]
        out.append(f"pre-flight {'passed' if self.ok else 'FAILED'} in {self.seconds:.1f} s")
        return "\n".join(out)


# -- the check --------------------------------------------------------------------------------

def run_preflight(model: str, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                  address: str | None = None, timeout_s: float = 60.0, cpus_per_worker: float | None = None,
                  use_gpu: bool | None = None, placement_timeout_s: float | None = None) -> PreflightResult:
    """Check every node the layout will use (see the module docstring); never raises for a broken node.

    `placement_timeout_s` (default: `timeout_s`) bounds the wait for the probes' placement groups, as
    the engine's own option of that name bounds its wait: a layout the cluster cannot place is not
    waited on longer in the check than in the engine.
    """
    from cluster.ray_connect import connect, worker_runtime_env

    t0 = time.perf_counter()
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    model = str(Path(model).expanduser().resolve())
    expected = model_files(model)
    if "config.json" not in expected:
        raise PreflightError(f"{model} is not a Hugging Face model folder on the driver (no config.json)")
    weight_bytes = sum(size for name, size in expected.items() if name.endswith(".safetensors"))
    connect(address)
    deadline = time.monotonic() + timeout_s

    # 1. reserve the layout's placement groups
    # (resources just released by another engine show up a moment later: re-check for a few seconds)
    settle = time.monotonic() + min(RESOURCE_WAIT_S, timeout_s / 4)
    while True:
        layout = _layout(tp, pp, cpus_per_worker, use_gpu)
        try:
            check_resources(layout, ray.available_resources(), [n["Resources"] for n in ray.nodes() if n["Alive"]])
            break
        except ResourceError as e:
            if time.monotonic() > settle:
                return PreflightResult([], [str(e)], time.perf_counter() - t0)
            time.sleep(0.25)
    free_before = ray.available_resources().get("CPU", 0.0)
    specs = bundles_for(1, pp, tp, layout.use_gpu, layout.cpus_per_worker)
    groups = [placement_group(list(s.bundles), strategy=s.strategy) for s in specs]
    probes = []
    try:
        wait_s = min(timeout_s, placement_timeout_s if placement_timeout_s is not None else timeout_s)
        ready, pending = ray.wait([g.ready() for g in groups], num_returns=len(groups),
                                  timeout=max(0.0, min(deadline - time.monotonic(), wait_s)))
        if pending:
            return PreflightResult([], [f"could not reserve the placement groups of layout {layout} within "
                                        f"{wait_s:g} s; free CPUs/GPUs or add nodes"], time.perf_counter() - t0)
        # 2. one probe per rank, in its bundle
        remote = ray.remote(_RankProbe)
        env = worker_runtime_env(REPO_ROOT)
        ranks = rank_grid(1, pp, tp)
        for r in ranks:
            strategy = PlacementGroupSchedulingStrategy(placement_group=groups[r.group_index],
                                                        placement_group_bundle_index=r.bundle_index)
            probes.append(remote.options(num_cpus=layout.cpus_per_worker, num_gpus=1 if layout.use_gpu else 0,
                                         scheduling_strategy=strategy, runtime_env=env,
                                         max_restarts=0).remote())
        where = _get([p.where.remote() for p in probes], deadline, "start")
        if isinstance(where, str):
            return PreflightResult([], [where], time.perf_counter() - t0)
        rows: dict[str, NodeRow] = {}
        for r, w in zip(ranks, where):
            row = rows.setdefault(w["node_id"], NodeRow(w["node_ip"], w["node_id"], []))
            row.ranks.append(f"pp{r.pp_rank}tp{r.tp_rank}")
        # 3. node facts, one probe per node, in parallel; 4. the wire test, all ranks at once
        first_probe = {}
        for p, w in zip(probes, where):
            first_probe.setdefault(w["node_id"], p)
        per_rank = weight_bytes / (tp * pp)
        fact_refs = {nid: p.node_facts.remote(model, expected, int(per_rank * len(rows[nid].ranks) * MEMORY_HEADROOM))
                     for nid, p in first_probe.items()}
        port = _get([probes[0].free_port.remote()], deadline, "rendezvous")
        wire_refs = []
        if not isinstance(port, str):
            left = max(1.0, deadline - time.monotonic())
            wire_refs = [p.wire_test.remote(r.local_rank, tp, pp, where[0]["node_ip"], port[0], left)
                         for p, r in zip(probes, ranks)]
        facts = {nid: _get([ref], deadline, "report") for nid, ref in fact_refs.items()}
        wires = _get(wire_refs, deadline, "collectives", per_ref=True) if wire_refs else [port] * len(ranks)
        # 5. judge
        driver = local_versions()
        for nid, row in rows.items():
            _judge(row, facts[nid], driver)
        check_nodes_agree(list(rows.values()))
        by_node: dict[str, list[str]] = {}
        for r, w, verdict in zip(ranks, where, wires):
            if verdict != "ok":
                by_node.setdefault(w["node_id"], []).append(f"pp{r.pp_rank}tp{r.tp_rank}: {verdict}")
        for nid, row in rows.items():
            bad = by_node.get(nid)
            row.facts["collectives"] = "ok" if not bad else "FAIL"
            if bad:
                row.problems.append(f"collective test failed ({'; '.join(bad)}); check that every node's "
                                    "GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME names an interface its peers can reach "
                                    "and that no firewall blocks the ports between nodes")
        return PreflightResult(list(rows.values()), [], time.perf_counter() - t0)
    finally:
        for p in probes:
            ray.kill(p)
        remove_groups(groups)
        _wait_cpus_back(free_before)


def _wait_cpus_back(free_before: float, timeout_s: float = 10.0) -> None:
    """Wait (bounded) until the CPUs the check reserved show as free again: the engine that starts
    next sizes its workers' share from `ray.available_resources()`, which lags the release."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < free_before - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.1)


def _layout(tp: int, pp: int, cpus_per_worker: float | None, use_gpu: bool | None) -> Layout:
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1 if use_gpu is None else use_gpu
    if cpus_per_worker is None:
        largest = max((float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=None)
        cpus_per_worker = default_cpu_share(tp * pp, tp, float(ray.available_resources().get("CPU", 0)), largest)
    return Layout(tp=tp, pp=pp, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu)


def _get(refs: list, deadline: float, what: str, per_ref: bool = False):
    """Values of `refs` by the deadline; else a message (or, per_ref, a message in each missing slot)."""
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
    out = []
    for ref in refs:
        if ref in pending:
            msg = f"no answer within the pre-flight timeout ({what})"
            if not per_ref:
                return msg
            out.append(msg)
            continue
        try:
            out.append(ray.get(ref))
        except Exception as e:   # a probe that raised: its message, one line
            msg = f"{what} failed: {str(e).strip().splitlines()[-1][:300]}"
            if not per_ref:
                return msg
            out.append(msg)
    return out


def _judge(row: NodeRow, facts, driver: dict) -> None:
    if isinstance(facts, str):
        row.problems.append(facts)
        return
    facts = facts[0]
    free_gib, need_gib = facts["free_bytes"] / 2**30, facts["need_bytes"] / 2**30
    row.facts.update({k: facts[k] for k in ("python", "ray", "torch", "shardline", "iface")},
                     device=f"{facts['device']}/{facts['backend']}", free_gib=f"{free_gib:.1f}",
                     need_gib=f"{need_gib:.2f}", model="ok" if facts["model_problem"] is None else "FAIL")
    for key in ("python", "ray", "torch", "shardline"):
        if facts[key] != driver[key]:
            fix = "run the same checkout (ray job submit --working-dir .)" if key == "shardline" else \
                f"install {key} {driver[key]} on this node (the same venv everywhere)"
            row.problems.append(f"{key} {facts[key]} differs from the driver's {driver[key]}; {fix}")
    if facts["model_problem"]:
        row.problems.append(facts["model_problem"])
    if facts["iface_problem"]:
        row.problems.append(facts["iface_problem"])
    if facts["free_bytes"] < facts["need_bytes"]:
        row.problems.append(f"{free_gib:.2f} GiB free, its shards need about {need_gib:.2f} GiB; free memory, "
                            "use more nodes (larger pipeline/tensor parallel size) or a smaller dtype")


def check_nodes_agree(rows: list[NodeRow]) -> None:
    """Every node must use the same device type and backend (gloo everywhere, or NCCL everywhere)."""
    kinds = {r.facts.get("device") for r in rows if r.facts.get("device")}
    if len(kinds) > 1:
        for r in rows:
            if r.facts.get("device") != sorted(kinds)[0]:
                r.problems.append(f"device/backend {r.facts['device']} differs from other nodes' {sorted(kinds)[0]}; "
                                  "use GPU nodes everywhere or CPU nodes everywhere")


def preflight_if_multinode(config, address: str | None) -> bool:
    """What `LLM(...)` runs before starting workers: the check, when the cluster has several alive nodes.

    Returns True if it connected this process to Ray (the engine then owns that connection).
    Raises `PreflightError` for a broken node. Cluster-wide shortfalls (not enough CPUs, a
    placement that cannot be met) are left to the executor, which reports them itself.
    """
    from cluster.ray_connect import connect

    if address is None and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        return False            # LLM is about to start a local, single-node Ray
    joined = connect(address)
    try:
        check_if_multinode(config.model, config.tensor_parallel_size, config.pipeline_parallel_size,
                           skip_hint="LLM(..., preflight=False)", nodes_only=True,
                           timeout_s=float(config.preflight_timeout_s), cpus_per_worker=config.cpus_per_worker,
                           use_gpu=config.use_gpu, placement_timeout_s=config.placement_timeout_s)
    except BaseException:
        if joined:
            ray.shutdown()
        raise
    return joined


def check_if_multinode(model: str, tp: int, pp: int, skip_hint: str, nodes_only: bool = False,
                       **kwargs) -> PreflightResult | None:
    """`run_preflight(model, tp, pp, **kwargs)` when the connected cluster has several alive nodes, else None.

    Raises `PreflightError` (the first problem, how to skip the check: `skip_hint`, and the table)
    when the check fails; with `nodes_only`, only for a broken node, not for a cluster-wide shortfall.
    Used by `LLM(...)` (above) and `shardline serve` before it deploys anything.
    """
    if sum(1 for n in ray.nodes() if n["Alive"]) <= 1:
        return None
    result = run_preflight(model, tp, pp, **kwargs)
    broken = (bool(result.rows) and not all(r.ok for r in result.rows)) if nodes_only else not result.ok
    if broken:
        raise PreflightError(f"pre-flight failed: {result.first_problem()} (skip the check with {skip_hint})\n"
                             f"{result.table()}")
    return result
