"""Property tests of `ShardPlan` for random model sizes and every T from 1 to the head count.

For each plan: query heads, MLP columns and padded vocabulary rows are covered exactly once in
contiguous rank order; shares differ by at most one unit (a KV group of heads when T <= KV
heads, else one head; one column; one VOCAB_ALIGN block); every query head's KV head is on its
rank, a rank holds no KV head it does not use, and `kv_map` points each local query head at it.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig

from sharding.plan import VOCAB_ALIGN, ShardPlan


@st.composite
def model_sizes(draw):
    kv = draw(st.integers(1, 8))
    group = draw(st.integers(1, 6))
    return {"num_key_value_heads": kv, "num_attention_heads": kv * group,
            "intermediate_size": draw(st.integers(kv * group, 600)), "vocab_size": draw(st.integers(1, 3000)),
            "num_hidden_layers": draw(st.integers(1, 6))}


def assert_partition(ranges, total, unit, what):
    assert ranges[0].start == 0 and ranges[-1].stop == total, f"{what}: {ranges} do not cover [0, {total})"
    for a, b in zip(ranges, ranges[1:]):
        assert a.stop == b.start, f"{what}: {a} and {b} leave a gap or overlap"
    sizes = [len(r) for r in ranges]
    assert all(s % unit == 0 for s in sizes), f"{what}: {sizes} are not whole units of {unit}"
    assert max(sizes) - min(sizes) <= unit, f"{what}: sizes {sizes} differ by more than {unit}"


@settings(max_examples=60, deadline=None)
@given(sizes=model_sizes())
def test_every_tp_up_to_the_head_count_partitions_the_model(sizes):
    cfg = LlamaConfig(hidden_size=8 * sizes["num_attention_heads"], **sizes)
    heads, kv, group = sizes["num_attention_heads"], sizes["num_key_value_heads"], 0
    group = heads // kv
    for tp in range(1, heads + 1):
        plan = ShardPlan.build(cfg, tp=tp, pp=1)
        head_unit = group if tp <= kv else 1
        assert_partition([plan.heads(r) for r in range(tp)], heads, head_unit, f"tp={tp} heads")
        assert_partition([plan.columns(r) for r in range(tp)], sizes["intermediate_size"], 1, f"tp={tp} columns")
        assert_partition([plan.vocab_rows(r) for r in range(tp)], plan.padded_vocab_size, VOCAB_ALIGN,
                         f"tp={tp} vocabulary")
        assert 0 <= plan.padded_vocab_size - sizes["vocab_size"] < VOCAB_ALIGN
        for r in range(tp):
            mine, kv_mine = plan.heads(r), plan.kv_heads(r)
            assert len(mine) >= 1
            assert set(kv_mine) == {h // group for h in mine}, f"tp={tp} rank {r}: KV heads {kv_mine} for {mine}"
            assert [kv_mine[i] for i in plan.kv_map(r)] == [h // group for h in mine]
        holders = [sum(k in plan.kv_heads(r) for r in range(tp)) for k in range(kv)]
        if tp <= kv:
            assert holders == [1] * kv, f"tp={tp}: whole KV groups must not be replicated, got {holders}"
        else:
            assert min(holders) >= 1
        assert plan.max_kv_heads_per_rank == max(len(plan.kv_heads(r)) for r in range(tp))
        imbalance = plan.imbalance()
        assert imbalance.flops >= 1.0 and imbalance.kv_bytes >= 1.0
