"""Session fixtures shared by every test: tiny random model folders and the bundled real model.

Each fixture returns a `pathlib.Path` to an HF folder (config.json, safetensors, tokenizer),
built once per session. To run a test on every tiny architecture:

    @pytest.mark.parametrize("model_fixture", TINY_MODEL_FIXTURES)
    def test_x(model_fixture, request):
        model_dir = request.getfixturevalue(model_fixture)
"""

from __future__ import annotations

import pathlib

import pytest

from tests.fixtures.tiny_models import TINY_MODEL_FIXTURES, build_fixture

__all__ = ["TINY_MODEL_FIXTURES"]


def _tiny(name: str, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_fixture(name, tmp_path_factory.mktemp(name.removesuffix("_dir")))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> pathlib.Path:
    """Llama: 8 heads, 8 KV heads, 4 layers, vocab 509, untied lm_head, sharded checkpoint."""
    return _tiny("tiny_llama_dir", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_llama_gqa_dir(tmp_path_factory) -> pathlib.Path:
    """Llama: 8 heads, 4 KV heads, 4 layers, vocab 509, tied embeddings, one safetensors file."""
    return _tiny("tiny_llama_gqa_dir", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_llama_rope_scaled_dir(tmp_path_factory) -> pathlib.Path:
    """Llama: 8/8 heads, untied, llama3 rope scaling (factor 8, original 64 positions)."""
    return _tiny("tiny_llama_rope_scaled_dir", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> pathlib.Path:
    """Qwen2: 8 heads, 4 KV heads, q/k/v bias, untied, one safetensors file."""
    return _tiny("tiny_qwen2_dir", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> pathlib.Path:
    """Mistral: 8 heads, 4 KV heads, no sliding window, untied, one safetensors file."""
    return _tiny("tiny_mistral_dir", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> pathlib.Path:
    """GPT-2: 8 heads, 4 layers, vocab 509, tied lm_head, sharded checkpoint."""
    return _tiny("tiny_gpt2_dir", tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_dir() -> pathlib.Path:
    """The bundled SmolLM2-135M-Instruct, converted once into the Shardline cache.

    A failure here is an ERROR with the reason, never a skip: the real model must be available.
    """
    from cluster.model_prep import prepare_model

    try:
        return prepare_model()
    except Exception as exc:
        pytest.fail(f"cluster.model_prep.prepare_model() failed: {exc}", pytrace=False)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test draws its random tensors from a fixed seed, so a failure reproduces; to check that
    an assertion holds beyond one draw, sweep it: SHARDLINE_TEST_SEED=1 .. N pytest tests/unit."""
    import os

    import torch

    torch.manual_seed(int(os.environ.get("SHARDLINE_TEST_SEED", "0")))
