"""Ray fixtures: one local Ray per test module (ray.init costs seconds), always shut down.

Model folders (`tiny_llama_dir`, `tiny_gpt2_dir`, `smollm2_dir`) come from tests/conftest.py.
Never `ray stop` here: it would kill every Ray process on the machine, other people's too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager

import pytest
import ray

from cluster.ray_connect import keep_ray_on_loopback

SMALL_OBJECT_STORE = 100 * 2**20   # per simulated node: a few nodes fit in memory
TEST_CPUS = 2   # logical CPUs of the test cluster, whatever the machine has: same shares everywhere


@contextmanager
def _no_ray_address():
    """Tests start their own Ray; an inherited RAY_ADDRESS would make the engine join another one."""
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def start_local_ray(include_dashboard: bool = False) -> str:
    """A single-node Ray on 127.0.0.1 with TEST_CPUS CPUs; returns its GCS address."""
    keep_ray_on_loopback()
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=TEST_CPUS, include_dashboard=include_dashboard, log_to_driver=False,
             _node_ip_address="127.0.0.1", logging_level="WARNING")
    return ray.get_runtime_context().gcs_address


@pytest.fixture(scope="module")
def ray_local(request):
    """GCS address of this module's local Ray. Set `RAY_DASHBOARD = True` in a module for the state API."""
    with _no_ray_address():
        address = start_local_ray(include_dashboard=getattr(request.module, "RAY_DASHBOARD", False))
        try:
            yield address
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def ray_tmpdir():
    """A short RAY_TMPDIR (unix socket paths are limited to ~108 bytes), removed afterwards."""
    path = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = path
    try:
        yield path
    finally:
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def simulated_cluster(nodes: dict[str, dict]):
    """A `ray.cluster_utils.Cluster` on loopback with this driver connected: a 0-CPU head (it hosts
    only the driver) plus one node per entry of `nodes` (name -> `add_node` keywords).

    Yields (cluster, {name: node}); always shut down.
    """
    from ray.cluster_utils import Cluster

    keep_ray_on_loopback()
    if ray.is_initialized():
        ray.shutdown()
    with _no_ray_address():
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                "object_store_memory": SMALL_OBJECT_STORE})
        try:
            added = {name: cluster.add_node(**{"object_store_memory": SMALL_OBJECT_STORE, **kwargs})
                     for name, kwargs in nodes.items()}
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
            yield cluster, added
        finally:
            ray.shutdown()
            cluster.shutdown()
