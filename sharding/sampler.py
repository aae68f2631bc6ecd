"""Turn last-stage logits into tokens: penalties, temperature, top-k/top-p/min-p, logprobs.

Batched over sequences; the only per-sequence loops are for the rare cases that need one
(min_tokens masking and per-request seeds). A seeded request draws its noise from a generator
seeded by (seed, output index), so its tokens do not depend on what else is in the batch, nor
on whether it was preempted and recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.wire import SeqSampling

_GREEDY_EPS = 1e-5


@dataclass
class SamplerInput:
    sampling: list[SeqSampling]
    histories: list[list[int]]      # every token of each sequence so far (prompt + outputs)
    num_prompt: list[int]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]] | None]


def _mix_seed(seed: int, index: int) -> int:
    # splitmix64-style mixing so nearby (seed, index) pairs give unrelated streams
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**63 - 1)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, inp: SamplerInput) -> SamplerOutput:
        # logits: [B, V] float32 (the whole vocabulary, unpadded); logprobs are of these raw logits
        raw = logits
        logits = self._apply_penalties(logits, inp)
        temps = torch.tensor([s.temperature for s in inp.sampling], device=logits.device)
        greedy = temps < _GREEDY_EPS
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            sampled = self._sample(logits, temps.clamp_min(_GREEDY_EPS), inp)
            tokens = torch.where(greedy, tokens, sampled)
        # log p(token) = logit - logsumexp(logits): no [B, V] log-softmax unless top logprobs are wanted
        chosen = raw.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(raw, dim=-1)
        return SamplerOutput(tokens.tolist(), chosen.tolist(), self._top_logprobs(raw, inp))

    def _apply_penalties(self, logits: torch.Tensor, inp: SamplerInput) -> torch.Tensor:
        """Penalised copy of the logits (the input itself when nothing applies)."""
        batch, vocab = logits.shape
        rows = [i for i, s in enumerate(inp.sampling)
                if s.repetition_penalty != 1.0 or s.presence_penalty or s.frequency_penalty]
        suppress = [i for i, s in enumerate(inp.sampling) if s.min_tokens and s.suppress_token_ids
                    and len(inp.histories[i]) - inp.num_prompt[i] < s.min_tokens]
        if not rows and not suppress:
            return logits
        logits = logits.clone()
        if rows:
            # counts of output tokens and presence of any token, per row: [B, V]
            out_counts = torch.zeros(batch, vocab + 1, device=logits.device)
            seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=logits.device)
            for i in rows:
                hist = torch.tensor(inp.histories[i], dtype=torch.long, device=logits.device).clamp_(0, vocab)
                outs = hist[inp.num_prompt[i]:]
                out_counts[i].scatter_add_(0, outs, torch.ones_like(outs, dtype=out_counts.dtype))
                seen[i, hist] = True
            out_counts, seen = out_counts[:, :vocab], seen[:, :vocab]
            rep = torch.tensor([s.repetition_penalty for s in inp.sampling], device=logits.device)[:, None]
            penalised = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalised, logits)
            freq = torch.tensor([s.frequency_penalty for s in inp.sampling], device=logits.device)[:, None]
            pres = torch.tensor([s.presence_penalty for s in inp.sampling], device=logits.device)[:, None]
            logits = logits - freq * out_counts - pres * (out_counts > 0).to(logits.dtype)
        for i in suppress:
            logits[i, [t for t in inp.sampling[i].suppress_token_ids if 0 <= t < vocab]] = float("-inf")
        return logits

    def _sample(self, logits: torch.Tensor, temps: torch.Tensor, inp: SamplerInput) -> torch.Tensor:
        logits = logits / temps[:, None]
        vocab = logits.shape[-1]
        top_k = torch.tensor([s.top_k if s.top_k > 0 else vocab for s in inp.sampling], device=logits.device)
        top_p = torch.tensor([s.top_p for s in inp.sampling], device=logits.device)
        min_p = torch.tensor([s.min_p for s in inp.sampling], device=logits.device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        # top-k: drop everything below the k-th largest logit
        kth = sorted_logits.gather(1, (top_k.clamp(1, vocab) - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # top-p: keep the smallest prefix whose mass reaches p (always the first token)
        drop = probs.cumsum(dim=-1) - probs > top_p[:, None]
        # min-p: drop tokens less likely than min_p times the most likely one
        drop |= probs < (min_p[:, None] * probs[:, :1])
        drop[:, 0] = False
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        # Gumbel-max in exponential form: argmax(p / E), E ~ Exp(1)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, s in enumerate(inp.sampling):
            if s.seed is not None:
                g = torch.Generator(device=probs.device).manual_seed(
                    _mix_seed(s.seed, len(inp.histories[i]) - inp.num_prompt[i]))
                noise[i] = torch.empty(vocab, device=probs.device).exponential_(generator=g)
        # the noise is drawn per vocabulary id, not per sorted position, so a seed's stream is stable
        noise = noise.gather(1, order)
        choice = (probs / noise).argmax(dim=-1)
        return order.gather(1, choice[:, None]).squeeze(1)

    @staticmethod
    def _top_logprobs(raw: torch.Tensor, inp: SamplerInput) -> list[list[tuple[int, float]] | None]:
        wanted = [s.logprobs or 0 for s in inp.sampling]
        k = max(wanted, default=0)
        if k == 0:
            return [None if s.logprobs is None else [] for s in inp.sampling]
        raw_logprobs = torch.log_softmax(raw, dim=-1)
        values, ids = raw_logprobs.topk(min(k, raw_logprobs.shape[-1]), dim=-1)
        values, ids = values.tolist(), ids.tolist()
        return [None if s.logprobs is None else list(zip(ids[i][: s.logprobs], values[i][: s.logprobs]))
                for i, s in enumerate(inp.sampling)]
