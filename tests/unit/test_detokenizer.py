"""Incremental detokenization and stop strings."""

from __future__ import annotations

import functools
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from scheduler.detokenizer import IncrementalDetokenizer

CORPUS = ["The quick brown fox jumps over the lazy dog. Ünïcödé façade — 日本語のテキスト and émojis 🙂🚀.",
          "Stop strings may span token boundaries: END OF TEXT, ###, and \n\n newlines."] * 30


@functools.lru_cache
def byte_level() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@functools.lru_cache
def metaspace() -> Tokenizer:
    """SentencePiece-like: "▁" marks spaces, byte fallback for unknown characters."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]
                                  + [f"<0x{i:02X}>" for i in range(256)], show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return tok


TOKENIZERS = {"byte_level": byte_level, "metaspace": metaspace}


def stream(tok, prompt, out, **kw):
    d = IncrementalDetokenizer(tok, prompt, **kw)
    texts = []
    stop = None
    for t in out:
        stop = d.add_token(t)
        texts.append(d.text(finished=False))
        if stop is not None:
            break
    return d, texts, stop


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("skip", [True, False])
def test_incremental_text_equals_full_decode(name, skip):
    tok = TOKENIZERS[name]()
    rng = random.Random(0)
    vocab = tok.get_vocab_size()
    for _ in range(30):
        prompt = tok.encode(rng.choice(CORPUS)[:rng.randint(1, 40)]).ids or [5]
        if rng.random() < 0.7:
            out = tok.encode(rng.choice(CORPUS)[rng.randint(0, 40):]).ids[:25]
        else:
            out = [rng.randrange(vocab) for _ in range(25)]
        d, _, _ = stream(tok, prompt, out, skip_special_tokens=skip)
        full = tok.decode(prompt + out, skip_special_tokens=skip)
        head = tok.decode(prompt, skip_special_tokens=skip)
        want = full[len(head):] if full.startswith(head) else tok.decode(out, skip_special_tokens=skip)
        got = d.text(finished=True)
        if "\ufffd" not in full:
            assert got == want, (prompt, out)
        # random ids may form invalid UTF-8: no exact promise there (as vLLM), but decoding never raises


def test_first_token_decodes_in_prompt_context():
    tok = metaspace()
    prompt = tok.encode("The quick").ids
    out = tok.encode("The quick brown").ids[len(prompt):]
    d, _, _ = stream(tok, prompt, out)
    assert d.text(True) == " brown"


def test_special_tokens_skipped_or_kept():
    tok = byte_level()
    eos = tok.token_to_id("<eos>")
    ids = tok.encode("fox").ids
    assert stream(tok, [5], ids + [eos], skip_special_tokens=True)[0].text(True) == "fox"
    assert stream(tok, [5], ids + [eos], skip_special_tokens=False)[0].text(True) == "fox<eos>"


def char_ids(tok, text):
    """One token per character (forces stop strings to span tokens)."""
    return [i for ch in text for i in tok.encode(ch).ids]


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens_truncates(include):
    tok = byte_level()
    out = char_ids(tok, "abc END OF TEXT tail")
    d, texts, stop = stream(tok, [5], out, stop=["END OF"], include_stop_str_in_output=include)
    assert stop == "END OF"
    assert d.text(True) == ("abc END OF" if include else "abc ")
    assert d.add_token(out[-1]) == "END OF" and d.text(True) == texts[-1]   # final: no more text


def test_earliest_stop_string_wins():
    tok = byte_level()
    d, _, stop = stream(tok, [5], char_ids(tok, "xx ### END yy"), stop=["END", "##"])
    assert stop == "##" and d.text(True) == "xx "


def test_streamed_text_holds_back_possible_stop_prefix_and_is_monotonic():
    tok = byte_level()
    out = char_ids(tok, "a EN b END c")
    d, texts, stop = stream(tok, [5], out, stop=["END"])
    assert texts[2] == "a " and texts[3] == "a "          # "E", "EN" held back
    assert "a EN b" in texts                               # released once it can no longer match
    for prev, cur in zip(texts, texts[1:], strict=False):
        assert cur.startswith(prev)
    assert d.text(True) == "a EN b "


def test_stop_string_inside_one_token_and_spanning_multibyte():
    tok = byte_level()
    out = tok.encode("The quick brown fox").ids
    d, _, stop = stream(tok, [5], out, stop=["ick br"])
    assert stop == "ick br" and d.text(True) == "The qu"
    out = char_ids(tok, "日本語のテキスト")
    d, _, stop = stream(tok, [5], out, stop=["語の"])
    assert stop == "語の" and d.text(True) == "日本"


def test_stop_checks_can_be_deferred_for_min_tokens():
    tok = byte_level()
    d = IncrementalDetokenizer(tok, [5], stop=["ab"])
    ids = char_ids(tok, "abab")
    assert d.add_token(ids[0], check_stop=False) is None
    assert d.add_token(ids[1], check_stop=False) is None
    assert d.add_token(ids[2]) is None
    assert d.add_token(ids[3]) == "ab"
    assert d.text(True) == "ab"
