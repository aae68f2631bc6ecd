"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`): log p(prompt[i] | prompt[:i]) on the last stage.

A prefill chunk computing positions [c, c + n) of a sequence that asked for prompt logprobs
has, at position p, the logits of token p + 1: so the chunk reports tokens c + 1 .. up to the
last prompt token (the last position's logits pick the first output token, not a prompt one).
Chunked prefill therefore reports each prompt token exactly once, in order; a recomputed
(preempted) sequence reports them again, which the engine stores by position.

Logits are computed for at most `ROWS_PER_CALL` positions at a time (a whole prompt's
[positions, vocabulary] matrix would not fit), through the stage's own LM head, so under TP
every last-stage rank joins the same vocabulary all-gathers (the step is the same on all).
Logprobs are of the raw logits (no penalties or temperature), like the sampler's `logprobs`.
"""

from __future__ import annotations

import torch

ROWS_PER_CALL = 256


def prompt_rows(step, seqs) -> list[tuple[int, int, int, list[int], int]]:
    """(seq_id, first reported position, row in the step's tokens, target token ids, k) per wanting chunk."""
    wanted, row = [], 0
    for s in step.scheduled:
        seq = seqs[s.seq_id]
        k = seq.sampling.prompt_logprobs
        end = min(s.num_computed + s.num_new, seq.num_prompt - 1)
        if k is not None and s.num_computed < end:
            wanted.append((s.seq_id, s.num_computed + 1, row, seq.token_ids[s.num_computed + 1:end + 1], k))
        row += s.num_new
    return wanted


@torch.inference_mode()
def compute(model, step, seqs, hidden: torch.Tensor) -> list[list]:
    """Wire form for `StepOutput.prompt_logprobs`: [seq_id, first position, [[logprob, [[id, lp], ...]], ...]]."""
    out = []
    for seq_id, first, row, targets, k in prompt_rows(step, seqs):
        entries = []
        for i in range(0, len(targets), ROWS_PER_CALL):
            chunk = targets[i:i + ROWS_PER_CALL]
            rows = torch.arange(row + i, row + i + len(chunk), device=hidden.device)
            logprobs = torch.log_softmax(model.logits(hidden[rows]), dim=-1)
            actual = logprobs.gather(1, torch.tensor(chunk, device=logprobs.device)[:, None]).squeeze(1).tolist()
            if k:
                values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
                tops = [list(map(list, zip(a, b))) for a, b in zip(ids.tolist(), values.tolist())]
            else:
                tops = [[] for _ in chunk]
            entries += [[lp, top] for lp, top in zip(actual, tops)]
        out.append([seq_id, first, entries])
    return out
