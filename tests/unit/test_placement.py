"""The rank grid, bundles and resource check of `cluster.placement` (pure functions, no Ray)."""

from __future__ import annotations

import doctest
import itertools

import pytest

import cluster.placement as placement
from cluster.placement import (
    Layout,
    ResourceError,
    bundles_for,
    check_resources,
    default_cpu_share,
    rank_grid,
    torch_threads_for,
)

LAYOUTS = [(1, 1, 1), (1, 1, 2), (1, 2, 1), (2, 1, 1), (2, 2, 1), (1, 2, 2), (2, 2, 2), (3, 1, 1), (2, 3, 4)]


def test_docstring_examples():
    result = doctest.testmod(placement, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("dp,pp,tp", LAYOUTS)
def test_rank_grid_is_arange_reshape(dp, pp, tp):
    ranks = rank_grid(dp, pp, tp)
    assert [r.global_rank for r in ranks] == list(range(dp * pp * tp))
    for (replica, stage, t), r in zip(itertools.product(range(dp), range(pp), range(tp)), ranks, strict=True):
        assert (r.replica, r.pp_rank, r.tp_rank) == (replica, stage, t)
        assert r.local_rank == stage * tp + t          # sharding.dist's arange(pp * tp).reshape(pp, tp)
        assert r.group_index == replica * pp + stage   # one placement group per (replica, stage)
        assert r.bundle_index == t


@pytest.mark.parametrize("dp,pp,tp", LAYOUTS)
def test_every_rank_has_its_own_bundle_and_tp_groups_share_a_group(dp, pp, tp):
    groups = bundles_for(dp, pp, tp, use_gpu=False, cpus_per_worker=0.5)
    assert len(groups) == dp * pp
    assert all(g.strategy == "STRICT_PACK" and len(g.bundles) == tp for g in groups)
    slots = {(r.group_index, r.bundle_index) for r in rank_grid(dp, pp, tp)}
    assert len(slots) == dp * pp * tp
    for r in rank_grid(dp, pp, tp):
        g = groups[r.group_index]
        assert (g.replica, g.pp_rank) == (r.replica, r.pp_rank)


def test_bundles_cpu_and_gpu():
    (cpu,) = bundles_for(1, 1, 1, use_gpu=False, cpus_per_worker=0.25)
    assert cpu.bundles == ({"CPU": 0.25},)
    gpu = bundles_for(1, 2, 2, use_gpu=True, cpus_per_worker=1.0)
    assert all(b == {"GPU": 1, "CPU": 1.0} for g in gpu for b in g.bundles)
    with pytest.raises(ValueError, match="cpus_per_worker"):
        bundles_for(1, 1, 1, use_gpu=False, cpus_per_worker=0)


@pytest.mark.parametrize("dp,pp,tp", LAYOUTS)
@pytest.mark.parametrize("free", [0.5, 1.0, 2.0, 3.0, 16.0])
def test_default_share_always_fits(dp, pp, tp, free):
    n = dp * pp * tp
    share = default_cpu_share(n, tp, free)
    assert 0 < share <= 1.0
    if free / n >= 1e-4:
        check_resources(Layout(tp=tp, pp=pp, dp=dp, cpus_per_worker=share), {"CPU": free})


def test_default_share_respects_largest_node():
    assert default_cpu_share(4, tp=4, free_cpus=8.0, largest_node_cpus=2.0) == 0.5
    assert default_cpu_share(2, tp=1, free_cpus=8.0, largest_node_cpus=2.0) == 1.0


def test_torch_threads():
    assert [torch_threads_for(x) for x in (0.0001, 0.5, 0.9999, 1.0, 1.5, 4.0)] == [1, 1, 1, 1, 1, 4]


def test_resource_error_message_says_what_is_missing():
    with pytest.raises(ResourceError) as e:
        check_resources(Layout(tp=2, pp=2, dp=1, cpus_per_worker=0.5), {"CPU": 1.0})
    assert str(e.value).startswith(
        "layout tp=2 x pp=2 x dp=1 needs 4 workers x 0.5 CPU = 2.0 CPU; the cluster has 1.0 CPU free")


def test_gpu_layout_on_cpu_cluster():
    with pytest.raises(ResourceError, match=r"needs 2 workers x 1 GPU = 2 GPU; the cluster has 0 GPU free"):
        check_resources(Layout(tp=2, pp=1, use_gpu=True, cpus_per_worker=0.5), {"CPU": 2.0})
    check_resources(Layout(tp=2, pp=1, use_gpu=True, cpus_per_worker=0.5), {"CPU": 2.0, "GPU": 2.0})


def test_tp_group_larger_than_any_node():
    nodes = [{"CPU": 1.0}, {"CPU": 1.0}]
    check_resources(Layout(tp=2, pp=2, cpus_per_worker=0.5), {"CPU": 2.0}, nodes)   # one stage per node
    with pytest.raises(ResourceError, match="tensor-parallel group must share one node .* largest node has 1.0 CPU"):
        check_resources(Layout(tp=2, pp=1, cpus_per_worker=1.0), {"CPU": 2.0}, nodes)


def test_fractional_shares_do_not_trip_on_rounding():
    # no exception: 3 x 0.6666 and 3 x default share fit 2 CPUs despite float rounding ...
    assert check_resources(Layout(tp=1, pp=3, cpus_per_worker=0.6666), {"CPU": 2.0}) is None
    share = default_cpu_share(3, 3, 2.0)
    assert 3 * share <= 2.0 + 1e-9
    assert check_resources(Layout(tp=3, pp=1, cpus_per_worker=share), {"CPU": 2.0}, [{"CPU": 2.0}]) is None
    # ... while a share really too large still fails
    with pytest.raises(ResourceError, match="needs 3 workers"):
        check_resources(Layout(tp=1, pp=3, cpus_per_worker=0.7), {"CPU": 2.0})


def test_missing_gpus_named_before_node_sizes():
    with pytest.raises(ResourceError, match="needs 2 workers x 1 GPU = 2 GPU; the cluster has 0 GPU free"):
        check_resources(Layout(tp=2, pp=1, use_gpu=True, cpus_per_worker=0.5), {"CPU": 2.0}, [{"CPU": 2.0}])


def test_resource_errors_name_the_largest_tensor_parallel_size_that_fits():
    with pytest.raises(ResourceError, match=r"has 3.0 CPU free, so at most tensor_parallel_size=3 fits"):
        check_resources(Layout(tp=4, pp=2, cpus_per_worker=0.5), {"CPU": 3.0})
    with pytest.raises(ResourceError, match=r"largest node has 1.5 CPU, so at most tensor_parallel_size=3 fits"):
        placement.check_fits_a_node(Layout(tp=4, pp=1, cpus_per_worker=0.5), [{"CPU": 1.5}])
