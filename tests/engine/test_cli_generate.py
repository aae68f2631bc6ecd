"""`shardline generate`: the CLI drives LLM.generate, reads stdin, and every error is one line naming the flag."""

from __future__ import annotations

import io
import json

import pytest
from tokenizers import Tokenizer

from cluster.cli import main
from tests.fixtures.reference import hf_greedy


def _ids(model_dir, text: str) -> list[int]:
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.strip().splitlines()]


def test_generate_json_output_equals_transformers(tiny_llama_gqa_dir, capsys):
    prompt = "the quick brown fox"
    assert main(["generate", "--model", str(tiny_llama_gqa_dir), "--max-tokens", "6", "--json", prompt]) == 0
    (out,) = _json_lines(capsys.readouterr().out)
    assert out["prompt"] == prompt
    assert out["token_ids"] == hf_greedy(str(tiny_llama_gqa_dir), _ids(tiny_llama_gqa_dir, prompt), 6,
                                         stop_at_eos=True)[0]
    assert out["finish_reason"] in ("length", "stop")


def test_dash_and_piped_stdin_are_read_one_prompt_per_line(tiny_llama_gqa_dir, capsys, monkeypatch):
    model = str(tiny_llama_gqa_dir)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nOnce upon a time\n"))
    assert main(["generate", "--model", model, "--max-tokens", "3", "--json", "first", "-"]) == 0
    outs = _json_lines(capsys.readouterr().out)
    assert [o["prompt"] for o in outs] == ["first", "Hello", "Once upon a time"]   # never the literal "-"
    for o in outs:
        assert o["token_ids"] == hf_greedy(model, _ids(tiny_llama_gqa_dir, o["prompt"]), 3, stop_at_eos=True)[0]
    monkeypatch.setattr("sys.stdin", io.StringIO("piped prompt\n"))   # a pipe, no PROMPT argument
    assert main(["generate", "--model", model, "--max-tokens", "2", "--json"]) == 0
    assert [o["prompt"] for o in _json_lines(capsys.readouterr().out)] == ["piped prompt"]


def test_too_long_prompt_prints_the_finished_outputs_and_names_its_index(tiny_llama_gqa_dir, capsys):
    long_prompt = "word " * 300          # > the tiny model's 256 positions
    code = main(["generate", "--model", str(tiny_llama_gqa_dir), "--max-tokens", "2", "--json", "Hello",
                 long_prompt, "Once upon a time"])
    cap = capsys.readouterr()
    assert code == 2
    assert [o["prompt"] for o in _json_lines(cap.out)] == ["Hello", "Once upon a time"]
    err = cap.err.strip()
    assert "\n" not in err and err.startswith("shardline: error: PROMPT: 1 of 3 prompts rejected (prompt 1:")
    assert "max_model_len is 256" in err


# (argv after `generate --model DIR`, stdin or None, what the one error line must contain)
CLI_CASES = [
    ("tp_over_heads", ["--tp", "9", "hello"], None, "--tp: tensor_parallel_size=9 exceeds num_attention_heads=8"),
    ("dp_zero", ["--dp", "0", "hello"], None, "--dp: data_parallel_size=0"),
    ("pp_past_layers", ["--pp", "9", "hello"], None, "--pp: pipeline_parallel_size=9 exceeds"),
    ("seed_overflow", ["--seed", str(2**64), "hello"], None, "--seed: seed=18446744073709551616 is out of range"),
    ("seed_not_int", ["--seed", "abc", "hello"], None, "argument --seed: invalid int value: 'abc'"),
    ("max_tokens_zero", ["--max-tokens", "0", "hello"], None, "--max-tokens: max_tokens=0 is out of range"),
    ("temperature_inf", ["--temperature", "inf", "hello"], None, "--temperature: temperature=inf"),
    ("temperature_nan", ["--temperature", "nan", "hello"], None, "--temperature: temperature=nan"),
    ("temperature_negative", ["--temperature", "-1", "hello"], None, "--temperature: temperature=-1.0"),
    ("dtype_unknown", ["--dtype", "fp8", "hello"], None, "argument --dtype: invalid choice: 'fp8'"),
    ("empty_prompt", [""], None, "PROMPT: the prompt is empty"),
    ("empty_stdin", ["-"], "\n\n", "PROMPT: stdin held no prompt"),
    ("no_prompt_interactive", [], "tty", "PROMPT: give at least one prompt"),
    ("unknown_flag", ["--temprature", "0.5", "hello"], None, "unrecognized arguments: --temprature"),
]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("argv,stdin,text", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input_is_one_line_naming_the_flag(tiny_llama_gqa_dir, capsys, monkeypatch, argv, stdin, text):
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", _Tty("") if stdin == "tty" else io.StringIO(stdin))
    try:
        code = main(["generate", "--model", str(tiny_llama_gqa_dir), *argv])
    except SystemExit as e:   # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    errors = [line for line in err.splitlines() if "error:" in line]   # argparse prints its usage first
    assert len(errors) == 1 and text in errors[0], err
    assert err.splitlines()[-1] == errors[0]


def test_missing_model_folder_names_the_flag(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("shardline: error: --model: ") and str(tmp_path / "nope") in err
