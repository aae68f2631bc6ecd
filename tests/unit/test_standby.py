"""`cluster.ray_standby.Standby` without a cluster: when standbys are refused, and that a rebuild
takes a replica's standbys only as a whole set (no Ray calls on these paths)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from cluster.placement import Layout, rank_grid
from cluster.ray_standby import Standby
from scheduler.config import ConfigError, ConfigTypeError, EngineConfig


def executor(standby_workers: bool, use_gpu: bool = False):
    return SimpleNamespace(config=EngineConfig("m", standby_workers=standby_workers), closed=False,
                           layout=Layout(tp=2, pp=1, dp=2, use_gpu=use_gpu), ranks=rank_grid(2, 1, 2))


def test_standby_workers_with_gpus_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match=r"standby_workers=True is CPU-only so far.*drop standby_workers or use_gpu"):
        Standby(executor(True, use_gpu=True)).check()
    Standby(executor(True)).check()                  # CPU: fine
    Standby(executor(False, use_gpu=True)).check()   # not asked for: nothing to refuse


def test_a_replica_takes_its_standbys_only_when_every_rank_has_one():
    standby = Standby(executor(True))
    standby.actors = {0: "actor0", 2: "actor2", 3: "actor3"}   # replica 0 lacks rank 1; replica 1 = ranks 2, 3
    assert standby.take(0) == {}
    assert standby.actors == {0: "actor0", 2: "actor2", 3: "actor3"}, "an incomplete set stays for later"


def test_disabled_standby_starts_nothing():
    standby = Standby(executor(False))
    standby.fill([0, 1])   # would need Ray if it started anything
    assert standby._sets == 0 and standby.actors == {}, "fill started a set of standbys"
    assert not [t for t in threading.enumerate() if t.name.startswith("shardline-standby")]


def test_standby_workers_must_be_a_bool():
    with pytest.raises(ConfigTypeError, match="standby_workers"):
        EngineConfig("m", standby_workers="yes")
