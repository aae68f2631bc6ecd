"""Collect the prompt logprobs the last stage reports per prefill chunk into each request (no torch).

`Request.prompt_logprobs` has one slot per prompt token: slot 0 stays None (nothing predicts
the first token, as in vLLM), slot i becomes {prompt[i]: logprob, top-k ids: logprob}. Chunks
arrive in any order and may repeat after a preemption; they are stored by position.
"""

from __future__ import annotations


def start(num_prompt_tokens: int) -> list[dict[int, float] | None]:
    return [None] * num_prompt_tokens


def record(items, result, requests: dict) -> None:
    """Store one micro-batch's `StepOutput.prompt_logprobs` into the requests of its sequences."""
    by_id = {item.seq.seq_id: item.seq for item in items}
    for seq_id, first, entries in result.prompt_logprobs:
        seq = by_id.get(seq_id)
        if seq is None:
            raise RuntimeError(f"prompt logprobs for sequence {seq_id}, which this micro-batch did not schedule")
        if seq.is_finished:   # aborted or timed out while in flight: its request may be gone
            continue
        req = requests[seq.request_id]
        for pos, (logprob, top) in enumerate(entries, start=first):
            d = {seq.prompt_token_ids[pos]: float(logprob)}
            for t, lp in top:
                d.setdefault(int(t), float(lp))
            req.prompt_logprobs[pos] = d
