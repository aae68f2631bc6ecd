"""ShardPlan is pure: layer ranges, head/column ranges, vocabulary padding and every error."""

import pytest
from transformers import GPT2Config, LlamaConfig, Qwen2Config

from sharding.plan import LayoutError, ShardPlan, UnsupportedModelError


def smollm2_like():
    return LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
                       intermediate_size=1536, vocab_size=49152)


def test_balanced_layer_split_covers_every_layer_once():
    plan = ShardPlan.build(LlamaConfig(num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=4,
                                       hidden_size=64, intermediate_size=128), tp=1, pp=3)
    assert [list(plan.layers(p)) for p in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert plan.is_first(0) and plan.is_last(2) and not plan.is_last(1)


def test_layer_split_override_is_used_verbatim():
    plan = ShardPlan.build(smollm2_like(), tp=1, pp=2, layer_split=(10, 20))
    assert plan.layers(0) == range(0, 10) and plan.layers(1) == range(10, 30)


def test_smollm2_tp3_owns_one_kv_head_and_a_third_of_everything():
    plan = ShardPlan.build(smollm2_like(), tp=3, pp=2)
    assert plan.heads(1) == range(3, 6)
    assert plan.kv_heads(1) == range(1, 2)
    assert plan.columns(1) == range(512, 1024)
    assert plan.vocab_rows(2) == range(32768, 49152)
    assert plan.padded_vocab_size == 49152


def test_vocabulary_is_padded_so_every_rank_has_equal_rows():
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4,
                      intermediate_size=128, vocab_size=509)
    plan = ShardPlan.build(cfg, tp=4, pp=1)
    assert plan.vocab_shard_sizes == (128, 128, 128, 128) and plan.padded_vocab_size == 512
    assert [plan.vocab_rows(r).start for r in range(4)] == [0, 128, 256, 384]


def test_gpt2_dims_come_from_its_own_config_names():
    plan = ShardPlan.build(GPT2Config(n_embd=64, n_head=4, n_layer=6, vocab_size=100), tp=2, pp=3)
    assert plan.dims.intermediate_size == 256 and plan.max_kv_heads_per_rank == 2
    assert list(plan.layer_counts) == [2, 2, 2]


def test_tp_larger_than_the_head_count_names_the_largest_that_works():
    with pytest.raises(LayoutError, match=r"tensor_parallel_size=10 exceeds num_attention_heads=9 .*"
                                          r"the largest that works is 9"):
        ShardPlan.build(smollm2_like(), tp=10, pp=1)


def test_tp_not_dividing_the_heads_is_accepted_with_unequal_shares():
    plan = ShardPlan.build(smollm2_like(), tp=2, pp=1)
    assert [len(plan.heads(r)) for r in range(2)] == [6, 3]       # whole KV groups of 3
    assert [len(plan.columns(r)) for r in range(2)] == [768, 768]


def test_pp_larger_than_layers_is_rejected():
    with pytest.raises(LayoutError, match=r"pipeline_parallel_size=31 exceeds num_hidden_layers=30"):
        ShardPlan.build(smollm2_like(), tp=1, pp=31)


@pytest.mark.parametrize("split", [(10, 10), (0, 30), (15,), (31, -1)])
def test_bad_layer_split_is_rejected_with_an_example(split):
    with pytest.raises(LayoutError, match=r"layer_split=.* e\.g\. \[15, 15\]"):
        ShardPlan.build(smollm2_like(), tp=1, pp=2, layer_split=split)


@pytest.mark.parametrize("tp,pp", [(0, 1), (1, 0), (-2, 1)])
def test_non_positive_sizes_are_rejected(tp, pp):
    with pytest.raises(LayoutError, match="must be a positive integer"):
        ShardPlan.build(smollm2_like(), tp=tp, pp=pp)


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import BertConfig

    with pytest.raises(UnsupportedModelError, match=r"model_type='bert' is not supported; supported model types: "
                                                    r"gpt2, llama, mistral, qwen2"):
        ShardPlan.build(BertConfig(), tp=1, pp=1)


def test_qwen2_is_a_supported_llama_family_member():
    cfg = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=128, vocab_size=100)
    assert ShardPlan.build(cfg, tp=2, pp=2).dims.num_kv_heads == 2


@pytest.mark.parametrize("bad", ["Auto", 5, (), (0, 30), (1.5, 2), [True]])
def test_layer_split_config_rejects_anything_but_auto_none_or_counts(bad):
    from scheduler.config import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match=r"layer_split=.* must be \"auto\", None, or a tuple of positive layer"):
        EngineConfig(model="m", layer_split=bad)


def test_layer_split_config_defaults_to_auto_and_stores_lists_as_tuples():
    from scheduler.config import EngineConfig

    assert EngineConfig(model="m").layer_split == "auto"
    assert EngineConfig(model="m", layer_split=[20, 10]).layer_split == (20, 10)


def test_auto_without_a_cluster_to_size_it_from_is_the_even_split():
    assert ShardPlan.build(smollm2_like(), tp=1, pp=2, layer_split="auto").layer_counts == (15, 15)


def test_the_plan_describes_every_rank_and_its_imbalance():
    text = ShardPlan.build(smollm2_like(), tp=2, pp=1).describe()
    assert "tp rank 0: 6 heads [0, 6), 2 KV heads [0, 2), 768 MLP columns, 24576 vocabulary rows" in text
    assert "tp rank 1: 3 heads [6, 9), 1 KV heads [2, 3)" in text
    assert "imbalance (max/mean): FLOPs 1.066, KV bytes 1.333" in text


def test_layer_bytes_come_from_the_model_and_the_larger_node_gets_more_layers():
    from cluster.placement import split_layers_by_memory
    from sharding.layer_sizes import model_byte_sizes

    sizes = model_byte_sizes(smollm2_like())
    assert len(sizes.layers) == 30 and len(set(sizes.layers)) == 1
    assert sizes.first_extra == sizes.last_extra == 49152 * 576 * 4    # embedding; the head's own copy
    assert split_layers_by_memory(sizes.layers, [1.0, 1.0], sizes.first_extra, sizes.last_extra) == (15, 15)
    big_first = split_layers_by_memory(sizes.layers, [16.0, 8.0], sizes.first_extra, sizes.last_extra)
    assert big_first[0] > big_first[1] and sum(big_first) == 30
