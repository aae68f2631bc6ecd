"""`shardline generate`: the CLI drives LLM.generate and prints what it produced."""

from __future__ import annotations

import json

from cluster.cli import main
from tests.fixtures.reference import hf_greedy


def test_generate_json_output_equals_transformers(tiny_llama_gqa_dir, capsys):
    from tokenizers import Tokenizer

    prompt = "the quick brown fox"
    assert main(["generate", "--model", str(tiny_llama_gqa_dir), "--max-tokens", "6", "--json", prompt]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    out = json.loads(line)
    ids = Tokenizer.from_file(str(tiny_llama_gqa_dir / "tokenizer.json")).encode(prompt).ids
    assert out["prompt"] == prompt
    assert out["token_ids"] == hf_greedy(str(tiny_llama_gqa_dir), ids, 6, stop_at_eos=True)[0]
    assert out["finish_reason"] in ("length", "stop")


def test_generate_bad_layout_is_one_line_error(tiny_llama_gqa_dir, capsys):
    assert main(["generate", "--model", str(tiny_llama_gqa_dir), "--tp", "9", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("shardline: error: tensor_parallel_size=9 exceeds num_attention_heads=8") and "\n" not in err
