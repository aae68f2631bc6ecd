"""Joining a cluster that is not there fails fast with a message that says what to do."""

from __future__ import annotations

import time

import pytest
import ray

from cluster import LLM
from cluster.ray_connect import ClusterUnreachableError
from sharding.dist import free_port

pytestmark = [pytest.mark.ray, pytest.mark.timeout(120)]


def test_unreachable_address_fails_within_seconds(tiny_llama_dir, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    nobody = f"127.0.0.1:{free_port('127.0.0.1')}"
    t0 = time.monotonic()
    with pytest.raises(ClusterUnreachableError, match=r"cannot reach the Ray cluster at .*ray start --head"):
        LLM(str(tiny_llama_dir), pipeline_parallel_size=2, address=nobody)
    assert time.monotonic() - t0 < 15
    assert not ray.is_initialized()


def test_unreachable_ray_address_env_is_reported_too(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port('127.0.0.1')}")
    with pytest.raises(ClusterUnreachableError, match="RAY_ADDRESS"):
        LLM(str(tiny_llama_dir), pipeline_parallel_size=2)
