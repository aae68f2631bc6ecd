"""The worked examples in pure modules' docstrings are true (they are run, not just read)."""

from __future__ import annotations

import doctest

import pytest

import cluster.placement
import cluster.serve_cli
import scheduler.checks
import sharding.compiled
import sharding.dist
import sharding.plan


@pytest.mark.parametrize("module", [cluster.placement, cluster.serve_cli, sharding.compiled, sharding.dist,
                                    sharding.plan, scheduler.checks],
                         ids=lambda m: m.__name__)
def test_docstring_examples_hold(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
