"""What one node reports to the pre-flight check, and the rank stand-in that runs there.

Everything here runs inside a `_RankProbe` actor on the node being checked (or, for the
versions and file sizes the nodes are compared against, on the driver). The check itself, which
reserves the layout, starts the probes and judges their answers, is `cluster/preflight.py`.

Testing hook (documented, per node): a node whose Ray processes have the environment variable
SHARDLINE_PREFLIGHT_SIMULATE='{"versions": {"torch": "0.0"}, "missing": ["/path"]}' reports those
versions, and treats those paths (and everything under them) as absent. Set it in the environment
`ray start` runs in on that node (tests set it around `Cluster.add_node`); nothing else reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
from pathlib import Path

import ray

SIMULATE_ENV = "SHARDLINE_PREFLIGHT_SIMULATE"
REPO_ROOT = Path(__file__).resolve().parent.parent


def local_versions() -> dict:
    """Versions that must be equal on every node (Shardline: package version + source hash)."""
    import torch

    return {"python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__.split("+")[0],
            "shardline": shardline_version()}


def shardline_version() -> str:
    """'0.1.0+<hash of the cluster/, sharding/, scheduler/ sources this process imports>'."""
    try:
        from importlib.metadata import version
        base = version("shardline")
    except Exception:   # run from a source tree (ray job --working-dir) without an install
        base = "src"
    digest = hashlib.sha1()
    for pkg in ("cluster", "sharding", "scheduler"):
        root = REPO_ROOT / pkg
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return f"{base}+{digest.hexdigest()[:8]}"


def model_files(model: str) -> dict[str, int]:
    """{file name: size} of what a rank reads: config, tokenizer, safetensors (+ index)."""
    path = Path(model)
    names = ["config.json", "tokenizer.json"]
    names += sorted(p.name for p in path.glob("*.safetensors"))
    if (path / "model.safetensors.index.json").is_file():
        names.append("model.safetensors.index.json")
    return {n: (path / n).stat().st_size for n in names if (path / n).is_file()}


def _simulated() -> dict:
    raw = os.environ.get(SIMULATE_ENV)
    return json.loads(raw) if raw else {}


def check_model_here(model: str, expected: dict[str, int]) -> str | None:
    """None if every expected file is readable here with the expected size, else what is wrong."""
    hidden = [str(p) for p in _simulated().get("missing", [])]
    if any(model == h or model.startswith(h.rstrip("/") + "/") for h in hidden) or not os.path.isdir(model):
        return f"model folder {model} does not exist on this node; copy it there (same path on every node) or " \
               "put it on a shared filesystem"
    for name, size in expected.items():
        p = os.path.join(model, name)
        if not os.path.isfile(p):
            return f"{p} is missing on this node; copy the whole model folder"
        if not os.access(p, os.R_OK):
            return f"{p} is not readable on this node (permissions)"
        got = os.path.getsize(p)
        if got != size:
            return f"{p} has {got} bytes on this node, {size} on the driver; copy the folder again"
    return None


def collective_iface(node_ip: str) -> tuple[str, str | None]:
    """(interface the collectives will use, problem or None)."""
    import psutil

    want = os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME")
    addrs = psutil.net_if_addrs()
    carrying = next((name for name, lst in addrs.items()
                     if any(a.family == socket.AF_INET and a.address == node_ip for a in lst)), None)
    if want:
        if want not in addrs:
            return want, f"GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME={want} is not an interface of this node " \
                         f"(it has {sorted(addrs)}); set it to {carrying or 'the interface of the node address'}"
        stats = psutil.net_if_stats().get(want)
        if stats is not None and not stats.isup:
            return want, f"interface {want} is down on this node"
        if carrying and want != carrying:
            return want, f"collectives would use {want} but Ray binds {node_ip} on {carrying}; " \
                         f"set GLOO_SOCKET_IFNAME={carrying} NCCL_SOCKET_IFNAME={carrying} (start_head.sh does)"
        return want, None
    return f"{carrying or '?'} (auto)", None


class _RankProbe:
    """One rank's stand-in: reports its node and joins the layout's process group for a tiny test."""

    def __init__(self) -> None:
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()

    def where(self) -> dict:
        return {"node_id": self.node_id, "node_ip": self.node_ip}

    def node_facts(self, model: str, expected: dict[str, int], need_bytes: int) -> dict:
        import psutil

        from sharding.dist import select_device

        versions = {**local_versions(), **_simulated().get("versions", {})}
        device, backend = select_device()
        if device.type == "cuda":
            import torch
            free = torch.cuda.mem_get_info()[0]
        else:
            free = psutil.virtual_memory().available
        iface, iface_problem = collective_iface(self.node_ip)
        return {**versions, "model_problem": check_model_here(model, expected), "device": device.type,
                "backend": backend, "free_bytes": int(free), "need_bytes": int(need_bytes), "iface": iface,
                "iface_problem": iface_problem}

    def free_port(self) -> int:
        from sharding.dist import free_port

        return free_port(self.node_ip)

    def wire_test(self, rank: int, tp: int, pp: int, master: str, port: int, timeout_s: float) -> str:
        """All-reduce in this rank's TP group, send/recv to the next stage; 'ok' or what failed."""
        import torch
        import torch.distributed as dist

        from sharding.dist import init_replica, pp_recv, pp_send, tp_all_reduce

        groups = init_replica(rank, tp, pp, master, port, timeout_s=timeout_s)
        try:
            x = torch.full((4,), float(rank + 1))
            total = tp_all_reduce(x.clone(), groups)
            stage = groups.pp_rank
            want = sum(float(stage * tp + t + 1) for t in range(tp))
            if not torch.allclose(total, torch.full((4,), want)):
                return f"all-reduce in TP group of stage {stage} gave {total.tolist()}, expected {want}"
            if pp > 1:
                if not groups.is_first_stage:
                    got = pp_recv(torch.Size([4]), torch.float32, groups)
                    if not torch.equal(got, torch.full((4,), float(groups.prev_stage_rank))):
                        return f"recv from rank {groups.prev_stage_rank} gave {got.tolist()}"
                if not groups.is_last_stage:
                    pp_send(torch.full((4,), float(rank)), groups)
            return "ok"
        finally:
            groups.destroy()
            if dist.is_initialized():
                dist.destroy_process_group()
