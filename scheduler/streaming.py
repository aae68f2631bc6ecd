"""Incremental outputs: turn the engine's cumulative `RequestOutput`s into deltas (vLLM's DELTA kind).

The engine reports everything produced so far for a request; a stream wants only what is new:
the text, token ids and logprobs since the previous output. Detokenized text only ever grows
while a sequence runs (the detokenizer holds back a tail that could become a stop string), so
the delta is the suffix past what was already sent.
"""

from __future__ import annotations

import dataclasses

from scheduler.request import CompletionOutput, RequestOutput


class OutputDeltas:
    """Remembers how much of each (request, output index) was already sent."""

    def __init__(self) -> None:
        self._sent: dict[tuple[str, int], tuple[int, int]] = {}   # -> (chars, tokens)

    def delta(self, out: RequestOutput) -> RequestOutput:
        """The part of `out` not yet returned by an earlier call for the same request."""
        outputs = [self._delta_of(out.request_id, c) for c in out.outputs]
        if out.finished:
            self.forget(out.request_id, len(out.outputs))
        return dataclasses.replace(out, outputs=outputs)

    def _delta_of(self, rid: str, c: CompletionOutput) -> CompletionOutput:
        chars, toks = self._sent.get((rid, c.index), (0, 0))
        self._sent[(rid, c.index)] = (len(c.text), len(c.token_ids))
        return dataclasses.replace(c, text=c.text[chars:], token_ids=c.token_ids[toks:],
                                   logprobs=None if c.logprobs is None else c.logprobs[toks:])

    def forget(self, rid: str, n: int) -> None:
        for i in range(n):
            self._sent.pop((rid, i), None)


def merge_deltas(deltas: list[RequestOutput]) -> RequestOutput:
    """The cumulative output that a list of deltas of one request adds up to."""
    if not deltas:
        raise ValueError("merge_deltas needs at least one output")
    by_index: dict[int, CompletionOutput] = {}
    for d in deltas:
        for c in d.outputs:
            prev = by_index.get(c.index)
            if prev is None:
                by_index[c.index] = dataclasses.replace(c, token_ids=list(c.token_ids),
                                                        logprobs=None if c.logprobs is None else list(c.logprobs))
                continue
            prev.text += c.text
            prev.token_ids += c.token_ids
            if c.logprobs is not None:
                prev.logprobs = (prev.logprobs or []) + list(c.logprobs)
            prev.cumulative_logprob, prev.finish_reason, prev.stop_reason = (
                c.cumulative_logprob, c.finish_reason, c.stop_reason)
    last = deltas[-1]
    return dataclasses.replace(last, outputs=[by_index[i] for i in sorted(by_index)])
