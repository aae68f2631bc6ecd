"""Dense weight layouts chosen at load: the choice rule, one copy per weight, exact logits either way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scheduler.config import EngineConfig
from scheduler.wire import NewSequence, ScheduledSequence, SeqSampling, StepInput
from sharding.dist import init_single_rank
from sharding.layers import layout
from sharding.runner import ModelRunner
from tests.fixtures.reference import hf_prefill_logits

PROMPT = [3, 14, 15, 92, 65, 35, 8, 9, 7]


def test_in_out_storage_keeps_the_values_and_shape():
    w = torch.randn(6, 4)
    t = layout.store(w, "in_out")
    assert t.shape == (6, 4) and t.stride() == (1, 6) and layout.layout_of(t) == "in_out"
    assert torch.equal(t, w)
    x = torch.randn(3, 4)
    torch.testing.assert_close(F.linear(x, t), F.linear(x, w))
    assert layout.layout_of(layout.store(t, "out_in")) == "out_in"
    with pytest.raises(ValueError, match="layout='row'"):
        layout.store(w, "row")


@pytest.mark.parametrize("in_out,out_in,expected", [
    ([1.0, 1.0], [2.0, 2.0], "in_out"),     # faster at both batch sizes
    ([1.0, 1.0], [1.0, 1.0], "out_in"),     # a tie keeps the checkpoint's layout (no copy)
    ([0.5, 2.0], [1.0, 1.0], "out_in"),     # a win at batch 1 paid for at batch B: no net gain
    ([0.5, 1.2], [1.0, 1.0], "out_in"),     # the LM head's pattern: a batch-1 win never costs throughput
    ([0.5, 0.9], [1.0, 1.0], "in_out"),
])
def test_a_shape_switches_only_when_it_wins_without_costing_throughput(in_out, out_in, expected):
    assert layout.decide({"in_out": in_out, "out_in": out_in}) == expected


def test_every_dense_weight_in_the_measured_winner_gives_hf_logits(tiny_llama_gqa_dir, monkeypatch):
    """Forcing "in_out" everywhere (the tied LM head and embedding share one moved storage) is exact."""
    timed = []

    def fake_timing(shape, dtype, device, batches):
        timed.append(shape)
        return {"in_out": [1.0, 1.0], "out_in": [2.0, 2.0]}
    monkeypatch.setattr(layout, "_time_cold", fake_timing)
    monkeypatch.setattr(layout, "MIN_TIMED_BYTES", 0)
    runner = ModelRunner(EngineConfig(model=str(tiny_llama_gqa_dir), num_kv_blocks=8), init_single_rank())
    dense = layout.dense_layers(runner.model)
    assert dense and all(layout.layout_of(m.weight) == "in_out" for _, m in dense)
    assert len(timed) == len(set(timed)) == len(runner.layouts)   # each distinct shape timed once
    embed, head = runner.model.model.embed_tokens, runner.model.lm_head
    assert embed.weight is head.weight and layout.layout_of(embed.weight) == "in_out"
    logits = runner.forward_logits(StepInput(0, new_sequences=[
        NewSequence(0, PROMPT, len(PROMPT), [0], SeqSampling(temperature=0))],
        scheduled=[ScheduledSequence(0, 0, len(PROMPT), True)]))
    ref = hf_prefill_logits(str(tiny_llama_gqa_dir), PROMPT)[-1]
    assert (logits[0] - ref).abs().max().item() <= 1e-4
    assert logits[0].argmax().item() == ref.argmax().item()


def test_quantized_layers_keep_their_kernel_and_skip_the_layout_choice(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr(layout, "_time_cold", lambda *a: {"in_out": [1.0, 1.0], "out_in": [2.0, 2.0]})
    monkeypatch.setattr(layout, "MIN_TIMED_BYTES", 0)
    runner = ModelRunner(EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=8, quantization="int8"),
                         init_single_rank())
    names = {name for name, _ in layout.dense_layers(runner.model)}
    assert names == {"lm_head"}   # int8 is weight-only: it leaves the LM head dense
    assert layout.layout_of(runner.model.lm_head.weight) == "in_out"
