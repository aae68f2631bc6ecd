"""Incremental detokenization and stop strings for one output sequence.

Text comes from vLLM's prefix-offset scheme: each step decodes a short window of tokens
twice, without and with the new token, and emits the difference; a window that ends inside a
UTF-8 character (the decode ends in U+FFFD) is held until the character completes. The window
starts in the prompt's last tokens, so the first output token decodes in context (a
SentencePiece "▁word" after a prompt is " word", as in vLLM). `tokenizers.decoders.DecodeStream`
does the same but raises ("Invalid prefix encountered") on some byte-fallback sequences a
sampler can produce, and the engine must never die on a decode.

Stop strings may span token boundaries, so every check searches the tail of the whole text.
While a sequence runs, `text()` holds back the longest suffix that could still grow into a
stop string, so streamed text never has to be taken back; once a stop string matches, the
text ends before it (or after it with include_stop_str_in_output).
"""

from __future__ import annotations

from tokenizers import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens that prime the window (vLLM's initial offset)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0                 # window start
        self._read_offset = len(self._ids)      # tokens before this are already in the text
        self._stop = list(stop or [])
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        self._text = ""
        self.stopped_by: str | None = None

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Decode one more token; returns the stop string it completed, if any (text is then final)."""
        if self.stopped_by is not None:
            return self.stopped_by
        chunk = self._decode_step(token_id)
        if not chunk:
            return None
        self._text += chunk
        if check_stop and self._stop:
            self._check_stop(len(chunk))
        return self.stopped_by

    def _decode_step(self, token_id: int) -> str:
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=self._skip_special)
        full = decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip_special)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""                          # nothing new yet, or inside a UTF-8 character
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        if len(self._ids) > 4 * _CONTEXT_TOKENS:    # keep the id list short
            drop = self._prefix_offset
            self._ids = self._ids[drop:]
            self._prefix_offset, self._read_offset = 0, self._read_offset - drop
        return full[len(prefix):]

    def _check_stop(self, chunk_len: int) -> None:
        # a new match must end inside the new chunk, so it starts at most max_stop_len - 1 before it
        start = max(0, len(self._text) - chunk_len - self._max_stop_len + 1)
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = self._text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self._text = self._text[:i + len(s)] if self._include_stop else self._text[:i]
            self.stopped_by = s

    def text(self, finished: bool) -> str:
        """The output text; while running, without a tail that may still become a stop string."""
        if finished or self.stopped_by is not None or self._include_stop or not self._stop:
            return self._text
        return self._text[:len(self._text) - self._held_back()]

    def _held_back(self) -> int:
        t = self._text
        for k in range(min(self._max_stop_len - 1, len(t)), 0, -1):
            tail = t[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
