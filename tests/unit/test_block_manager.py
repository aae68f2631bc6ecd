"""BlockManager: allocation, reference counts, prefix caching, LRU eviction, no leaks."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.block_manager import BlockError, BlockManager
from scheduler.request import Sequence
from scheduler.wire import SeqSampling


def make_seq(prompt, out=()):
    s = Sequence("r", 0, list(prompt), SeqSampling())
    s.output_token_ids = list(out)
    return s


def compute_all(bm, seq):
    """Pretend the model computed every token but the last (as after a step)."""
    seq.num_computed_tokens = seq.num_tokens - 1
    bm.cache_computed_blocks(seq)


def test_allocate_and_free():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    s = make_seq(range(10))
    assert bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5 and s.num_computed_tokens == 0
    bm.free(s)
    assert bm.all_free() and s.block_table == []


def test_allocate_fails_without_side_effects():
    bm = BlockManager(2, 4)
    s = make_seq(range(9))     # needs 3 blocks
    assert not bm.allocate(s)
    assert bm.all_free() and s.block_table == []


def test_append_slots_grows_one_block_at_a_time():
    bm = BlockManager(4, 4)
    s = make_seq(range(4))
    bm.allocate(s)
    assert len(s.block_table) == 1
    s.output_token_ids.append(99)          # 5 tokens -> 2 blocks
    assert bm.can_append(s)
    bm.append_slots(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2
    bm.free(s)
    assert bm.all_free()


def test_double_free_is_detected():
    bm = BlockManager(4, 4)
    s = make_seq(range(5))
    bm.allocate(s)
    table = list(s.block_table)
    bm.free(s)
    s.block_table = table
    with pytest.raises(BlockError):
        bm.free(s)


def test_prefix_hit_shares_full_blocks_and_counts_them():
    bm = BlockManager(16, 4)
    a = make_seq(list(range(10)))
    bm.allocate(a)
    compute_all(bm, a)                      # blocks 0 and 1 full and computed -> hashed
    b = make_seq(list(range(8)) + [50, 51, 52])
    assert bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_computed_tokens == 8 and bm.prefix_hit_tokens == 8 and bm.prefix_hit_blocks == 2
    assert bm.ref_counts[a.block_table[0]] == 2
    bm.free(a)
    assert bm.ref_counts[b.block_table[0]] == 1
    bm.free(b)
    assert bm.all_free()


def test_last_prompt_token_is_never_served_from_cache():
    bm = BlockManager(16, 4)
    a = make_seq(list(range(9)))
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq(list(range(8)))            # exactly two full blocks, both cached
    bm.allocate(b)
    assert b.num_computed_tokens == 4       # the second block holds the last token: recomputed
    bm.free(a)
    bm.free(b)
    assert bm.all_free()


def test_different_prefix_same_block_content_does_not_hit():
    bm = BlockManager(16, 4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq([0, 0, 0, 0, 5, 6, 7, 8, 9])   # block 1 equal, but its parent differs
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    bm.free(a)
    bm.free(b)


def test_freed_cached_blocks_are_reused_until_evicted_lru():
    bm = BlockManager(4, 2)
    a = make_seq([1, 2, 3, 4, 5])            # 3 blocks, 2 full after compute
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    assert bm.all_free() and bm.num_free_blocks == 4
    b = make_seq([1, 2, 3, 4, 7])            # hits both cached blocks even though a is gone
    bm.allocate(b)
    assert b.num_computed_tokens == 4
    bm.free(b)
    # c takes all 4 blocks: plain blocks first, then cached ones are evicted (LRU)
    c = make_seq([9, 9, 9, 9, 9, 9, 9, 9])
    assert bm.allocate(c)
    bm.free(c)
    d = make_seq([1, 2, 3, 4, 7])
    bm.allocate(d)
    assert d.num_computed_tokens == 0        # evicted
    bm.free(d)
    assert bm.all_free()


def test_plain_free_blocks_are_used_before_evicting_cache():
    bm = BlockManager(7, 2)
    a = make_seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)                                # 2 cached + 5 plain
    c = make_seq([8, 8, 8, 8, 8, 8, 8])      # 4 blocks: all plain
    bm.allocate(c)
    b = make_seq([1, 2, 3, 4, 7])
    assert bm.allocate(b)
    assert b.num_computed_tokens == 4
    bm.free(b)
    bm.free(c)
    assert bm.all_free()


def test_hit_on_free_cached_block_counts_against_free_pool():
    bm = BlockManager(3, 2)
    a = make_seq([1, 2, 3])
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)                                # block with [1,2] cached and free
    b = make_seq([1, 2, 5, 6, 7, 8])         # needs 3 blocks: 1 hit + 2 new -> fits exactly
    assert bm.allocate(b)
    assert bm.num_free_blocks == 0
    bm.free(b)
    assert bm.all_free()


def test_prefix_caching_disabled_never_hits():
    bm = BlockManager(8, 2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    compute_all(bm, a)
    b = make_seq([1, 2, 3, 4, 5])
    bm.allocate(b)
    assert b.num_computed_tokens == 0 and bm.prefix_hit_tokens == 0
    bm.free(a)
    bm.free(b)


def test_reset_prefix_cache_forgets_free_blocks_only():
    bm = BlockManager(8, 2)
    a = make_seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    compute_all(bm, a)
    bm.free(a)
    bm.reset_prefix_cache()
    b = make_seq([1, 2, 3, 4, 5])
    bm.allocate(b)
    assert b.num_computed_tokens == 0
    bm.free(b)
    assert bm.all_free()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "append", "compute", "free"]),
                          st.integers(0, 7), st.lists(st.integers(0, 3), min_size=1, max_size=11)),
                max_size=60),
       st.booleans())
def test_random_operations_never_leak_or_double_free(ops, prefix):
    """Random alloc/append/compute/free: refcounts always equal the number of owners, nothing leaks."""
    bm = BlockManager(12, 3, enable_prefix_caching=prefix)
    live: dict[int, Sequence] = {}
    for op, slot, tokens in ops:
        seq = live.get(slot)
        if op == "alloc" and seq is None:
            s = make_seq(tokens)
            if bm.allocate(s):
                live[slot] = s
                assert s.num_computed_tokens < s.num_tokens
        elif op == "append" and seq is not None:
            seq.output_token_ids.append(tokens[0])
            if bm.can_append(seq):
                bm.append_slots(seq)
            else:
                bm.free(live.pop(slot))
        elif op == "compute" and seq is not None:
            seq.num_computed_tokens = min(seq.num_tokens - 1, len(seq.block_table) * bm.block_size)
            bm.cache_computed_blocks(seq)
        elif op == "free" and seq is not None:
            bm.free(live.pop(slot))
        owners = [0] * bm.num_blocks
        for s in live.values():
            assert len(s.block_table) == bm.blocks_needed(s.num_tokens)
            for b in s.block_table:
                owners[b] += 1
        assert owners == bm.ref_counts
        assert bm.num_free_blocks == sum(1 for c in owners if c == 0)
        for h, b in bm.hash_to_block.items():
            assert bm.block_hash[b] == h
    for s in list(live.values()):
        bm.free(s)
    assert bm.all_free()
