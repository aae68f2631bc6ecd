"""The slice loader: only this rank's bytes, and errors that name the file and the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from scheduler.config import EngineConfig
from scheduler.wire import NewSequence, ScheduledSequence, SeqSampling, StepInput
from sharding.dist import init_single_rank
from sharding.layers.linear import WeightShapeError
from sharding.loader import CheckpointError
from sharding.plan import UnsupportedModelError
from sharding.runner import ModelRunner
from tests.fixtures.reference import hf_prefill_logits


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _runner(model_dir, **kw):
    return ModelRunner(EngineConfig(model=str(model_dir), num_kv_blocks=8, **kw), init_single_rank())


def test_missing_shard_file_is_named(tiny_llama_dir, tmp_path):
    model = _copy(tiny_llama_dir, tmp_path)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (model / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        _runner(model)


def test_missing_tensor_is_named(tiny_gpt2_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_gpt2_dir.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, model / f.name)
    tensors = {}
    for f in sorted(tiny_gpt2_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    del tensors["transformer.h.1.mlp.c_fc.weight"]
    save_file(tensors, str(model / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.mlp\.c_fc\.weight"):
        _runner(model)


def test_shape_mismatch_names_tensor_and_shapes(tiny_llama_gqa_dir, tmp_path):
    model = _copy(tiny_llama_gqa_dir, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightShapeError, match=r"mlp\.(gate|up|down)_proj\.weight.*shape"):
        _runner(model)


def test_missing_model_folder_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found.*prepare-model"):
        _runner(tmp_path / "nowhere")


def test_unsupported_architecture_is_rejected_before_loading(tiny_llama_dir, tmp_path):
    model = _copy(tiny_llama_dir, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"] = "bert"
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="supported model types: gpt2, llama, mistral, qwen2"):
        _runner(model)


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.1), ("float16", 0.02)])
def test_half_precision_prefill_is_close_to_float32(tiny_llama_gqa_dir, dtype, tol):
    prompt = [3, 14, 15, 92, 65, 35]
    runner = _runner(tiny_llama_gqa_dir, dtype=dtype)
    assert runner.kv_caches[0].dtype == getattr(torch, dtype)
    logits = runner.forward_logits(StepInput(0, new_sequences=[
        NewSequence(0, prompt, len(prompt), [0], SeqSampling(temperature=0))],
        scheduled=[ScheduledSequence(0, 0, len(prompt), True)]))
    ref = hf_prefill_logits(str(tiny_llama_gqa_dir), prompt)[-1]
    scale = ref.abs().max().item()
    assert (logits[0] - ref).abs().max().item() <= tol * scale
    assert logits[0].argmax().item() == ref.argmax().item()
