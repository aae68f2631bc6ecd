"""The shared fixtures themselves: tokenizer, tiny models, HF reference helpers."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures import reference, tiny_models
from tests.fixtures.tiny_models import PROMPTS, TINY_MODEL_FIXTURES, VOCAB_SIZE

SHARDED = {"tiny_llama_dir", "tiny_gpt2_dir"}

# fixture -> (architecture, heads, kv heads, tied)
EXPECTED = {
    "tiny_llama_dir": ("LlamaForCausalLM", 8, 8, False),
    "tiny_llama_gqa_dir": ("LlamaForCausalLM", 8, 4, True),
    "tiny_llama_rope_scaled_dir": ("LlamaForCausalLM", 8, 8, False),
    "tiny_qwen2_dir": ("Qwen2ForCausalLM", 8, 4, False),
    "tiny_mistral_dir": ("MistralForCausalLM", 8, 4, False),
    "tiny_gpt2_dir": ("GPT2LMHeadModel", 8, 8, True),
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box they thrash (10x)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.mark.parametrize(
    "text", ["Hello, world!", "The quick brown fox jumps.", "  spaces\tand\nnewlines ", "Ünïcödé 你好 🙂", ""]
)
def test_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids) == text


def test_tokenizer_incremental_decode_is_prefix_stable(tokenizer):
    text = "Once upon a time, 42 foxes said: héllo 你好!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    for k in range(1, len(ids) + 1):
        # a byte-level token may end inside a UTF-8 character; the decoder shows U+FFFD there
        partial = tokenizer.decode(ids[:k]).rstrip("\ufffd")
        assert text.startswith(partial)
    assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens_and_chat_template(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == tiny_models.EOS_ID
    assert tokenizer.bos_token_id == tiny_models.EOS_ID
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id == tiny_models.PAD_ID
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|user|>\nhi<|endoftext|>\n<|assistant|>\n"


@pytest.mark.parametrize("model_fixture", TINY_MODEL_FIXTURES)
def test_tiny_model_loads_with_expected_shape(model_fixture, request):
    model_dir = request.getfixturevalue(model_fixture)
    config = json.loads((model_dir / "config.json").read_text())
    arch, heads, kv_heads, tied = EXPECTED[model_fixture]
    assert config["architectures"] == [arch]
    assert config.get("num_attention_heads", config.get("n_head")) == heads
    assert config.get("num_key_value_heads", heads) == kv_heads
    assert config.get("num_hidden_layers", config.get("n_layer")) == 4
    assert config["vocab_size"] == VOCAB_SIZE and VOCAB_SIZE % 4 != 0
    assert config.get("tie_word_embeddings", True) == tied
    assert "quantization_config" not in config
    assert (model_dir / "tokenizer.json").is_file() and (model_dir / "chat_template.jinja").is_file()

    model = reference.hf_model(model_dir)
    assert type(model).__name__ == arch and model.dtype == torch.float32
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied

    index = model_dir / "model.safetensors.index.json"
    if model_fixture in SHARDED:
        files = set(json.loads(index.read_text())["weight_map"].values())
        assert len(files) > 3 and all((model_dir / f).is_file() for f in files)
    else:
        assert not index.exists() and (model_dir / "model.safetensors").is_file()


def test_rope_scaled_config(tiny_llama_rope_scaled_dir):
    config = json.loads((tiny_llama_rope_scaled_dir / "config.json").read_text())
    # transformers 5 writes `rope_parameters` (rope_theta folded in), not `rope_scaling`
    assert config["rope_parameters"]["rope_type"] == "llama3"
    assert config["rope_parameters"]["factor"] == 8.0
    assert config["rope_parameters"]["original_max_position_embeddings"] == 64


def test_qwen2_has_nonzero_qkv_bias(tiny_qwen2_dir):
    model = reference.hf_model(tiny_qwen2_dir)
    attn = model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None and proj.bias.abs().sum() > 0
    assert attn.o_proj.bias is None


@pytest.mark.parametrize("model_fixture", TINY_MODEL_FIXTURES)
def test_hf_greedy_runs_exactly_max_new_tokens(model_fixture, request):
    model_dir = request.getfixturevalue(model_fixture)
    prompt = [5, 17, 42, 99]
    tokens, logprobs = reference.hf_greedy(model_dir, prompt, max_new_tokens=12)
    assert len(tokens) == len(logprobs) == 12
    assert all(lp <= 0.0 for lp in logprobs)
    # consistent with a plain forward pass over the whole sequence
    logits = reference.hf_prefill_logits(model_dir, prompt + tokens)
    assert logits.shape == (len(prompt) + 12, VOCAB_SIZE)
    assert logits[len(prompt) - 1 : -1].argmax(-1).tolist() == tokens
    expected = torch.log_softmax(logits[len(prompt) - 1 : -1], -1).gather(1, torch.tensor(tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_fixture", TINY_MODEL_FIXTURES)
def test_greedy_margins_are_clear_on_standard_prompts(model_fixture, request, tokenizer):
    model = reference.hf_model(request.getfixturevalue(model_fixture))
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    assert min(tiny_models.greedy_margins(model, prompts, max_new_tokens=32)) > 1e-2


# A prompt whose greedy path on tiny_llama_dir really emits EOS (found by a seed search): a "stops at
# EOS" test on a prompt that never reaches EOS would pass whatever stop_at_eos did.
EOS_PROMPT = [40, 179, 308, 434, 312, 149, 46, 263, 476, 178, 203]


def test_hf_greedy_stop_at_eos(tiny_llama_dir):
    tokens, logprobs = reference.hf_greedy(tiny_llama_dir, EOS_PROMPT, max_new_tokens=40, stop_at_eos=True)
    assert tokens[-1] == tiny_models.EOS_ID and len(tokens) < 40 and len(logprobs) == len(tokens)
    assert tiny_models.EOS_ID not in tokens[:-1]
    full, _ = reference.hf_greedy(tiny_llama_dir, EOS_PROMPT, max_new_tokens=len(tokens) + 3)
    assert full[:len(tokens)] == tokens and len(full) == len(tokens) + 3   # without stop_at_eos it goes on


def test_hf_beam_search_returns_num_beams_sequences(tiny_gpt2_dir):
    beams = reference.hf_beam_search(tiny_gpt2_dir, [5, 17, 42], num_beams=3, max_new_tokens=6)
    assert len(beams) == 3
    assert all(1 <= len(b) <= 6 for b in beams)
    assert len({tuple(b) for b in beams}) == 3
