"""A deterministic pure-Python "language model" behind the Executor protocol, for engine tests.

The toy keeps what a real rank keeps: a per-sequence cache fed only by the wire (NewSequence in
full, ScheduledSequence diffs) and a paged KV cache in which each slot stores the token
computed there. To sample, it reads the sequence's whole history back THROUGH ITS BLOCK TABLE,
so a wrong block table, a prefix-cache hit on the wrong block, a skipped chunk or a stale
diff changes the output (or trips an assertion) instead of passing silently.

Next token = hash(history [, seed]) % VOCAB; logprob = a fixed function of the same hash. So
the output depends only on the tokens, never on batching, chunking, preemption or prefix hits.
Every message goes through the msgpack codec.
"""

from __future__ import annotations

import random

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from scheduler.executor import NeverRebuilds
from scheduler.wire import (
    StepInput,
    StepOutput,
    decode_step_input,
    decode_step_output,
    encode_step_input,
    encode_step_output,
)

EOS = 0
ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,"
VOCAB = 1 + len(ALPHABET)          # id 0 is <eos>, id i >= 1 is ALPHABET[i - 1]


def make_tokenizer() -> Tokenizer:
    """One character per token; <eos> is special."""
    vocab = {"<eos>": EOS} | {c: i + 1 for i, c in enumerate(ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<eos>"])
    return tok


def _hash(history, seed=None) -> int:
    h = 1469598103934665603
    for t in history:
        h = ((h ^ (t + 1)) * 1099511628211) % 2**64
    if seed is not None:
        h = ((h ^ (seed + 7919)) * 1099511628211) % 2**64
    # splitmix64 finalizer: FNV's low bits are poorly mixed
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) % 2**64
    return h ^ (h >> 31)


def toy_next(history, seed=None, suppress=()) -> tuple[int, float]:
    """The toy's next token and its logprob for a history (the reference)."""
    h = _hash(history, seed)
    tok = h % VOCAB
    while tok in suppress:
        tok = (tok + 1) % VOCAB
    return tok, -(1 + (h >> 20) % 1000) / 500.0


def toy_top(tok: int, lp: float, k: int) -> list[tuple[int, float]]:
    return [(tok, lp)] + [((tok + j) % VOCAB, lp - 0.25 * j) for j in range(1, k)]


def reference(prompt, max_tokens, *, eos=(EOS,), ignore_eos=False, stop_token_ids=(), min_tokens=0,
              seed=None, max_len=10**9) -> tuple[list[int], list[float], str]:
    """What the engine must return for one sequence with the toy model (no stop strings)."""
    toks, lps = [], []
    while True:
        suppress = set(stop_token_ids) | (set() if ignore_eos else set(eos)) if len(toks) < min_tokens else ()
        t, lp = toy_next(list(prompt) + toks, seed, suppress)
        toks.append(t)
        lps.append(lp)
        may_stop = len(toks) >= min_tokens
        if may_stop and not ignore_eos and t in eos:
            return toks, lps, "stop"
        if may_stop and t in stop_token_ids:
            return toks, lps, "stop"
        if len(toks) >= max_tokens or len(prompt) + len(toks) >= max_len:
            return toks, lps, "length"


class _RankSeq:
    def __init__(self, token_ids, num_prompt, block_ids, sampling):
        self.token_ids, self.block_ids = list(token_ids), list(block_ids)
        self.num_prompt, self.sampling = num_prompt, sampling


class ToyExecutor(NeverRebuilds):
    """Executor protocol over the toy model: `num_replicas` replicas of `num_kv_blocks` blocks."""

    def __init__(self, num_kv_blocks: int, block_size: int, num_replicas: int = 1, max_in_flight: int = 1) -> None:
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.num_replicas = num_replicas
        self.max_in_flight = max_in_flight
        # kv[replica][block][offset] = (position, token) written when that token was computed
        self.kv = [[[None] * block_size for _ in range(num_kv_blocks)] for _ in range(num_replicas)]
        self.seqs: list[dict[int, _RankSeq]] = [{} for _ in range(num_replicas)]
        self.rng = random.Random(0)
        self.calls: list[list[StepInput]] = []
        self.max_tokens_per_step = 0
        self.max_seqs_per_step = 0
        self.shut = False

    def execute(self, steps: list[StepInput]) -> list[StepOutput]:
        steps = [decode_step_input(encode_step_input(s)) for s in steps]
        self.calls.append(steps)
        seen = set()
        per_replica: dict[int, int] = {}
        for s in steps:
            per_replica[s.replica] = per_replica.get(s.replica, 0) + 1
            for x in s.scheduled:
                assert (s.replica, x.seq_id) not in seen, f"seq {x.seq_id} scheduled twice in one step"
                seen.add((s.replica, x.seq_id))
        assert all(n <= self.max_in_flight for n in per_replica.values()), per_replica
        self.max_seqs_per_step = max(self.max_seqs_per_step, len(seen))
        return [decode_step_output(encode_step_output(self._run(s))) for s in steps]

    def _run(self, step: StepInput) -> StepOutput:
        cache, kv, bs = self.seqs[step.replica], self.kv[step.replica], self.block_size
        for sid in step.finished_seq_ids:
            assert cache.pop(sid, None) is not None, f"dropping seq {sid} the rank never had"
        for n in step.new_sequences:
            assert n.seq_id not in cache, f"seq {n.seq_id} sent as new twice"
            cache[n.seq_id] = _RankSeq(n.token_ids, n.num_prompt_tokens, n.block_ids, n.sampling)
        out = StepOutput(step.step_id, step.replica, step.micro_batch)
        for x in step.scheduled:
            seq = cache[x.seq_id]
            seq.token_ids += x.appended_token_ids
            seq.block_ids += x.new_block_ids
            end = x.num_computed + x.num_new
            assert x.num_new >= 1 and end <= len(seq.token_ids) <= len(seq.block_ids) * bs
            # the cache must already hold [0, num_computed) (computed earlier or a prefix hit)
            for p in range(x.num_computed):
                assert kv[seq.block_ids[p // bs]][p % bs] == (p, seq.token_ids[p]), f"seq {x.seq_id} pos {p} stale"
            for p in range(x.num_computed, end):
                kv[seq.block_ids[p // bs]][p % bs] = (p, seq.token_ids[p])
            if not x.sample:
                continue
            assert end == len(seq.token_ids), "sampling before the last token was computed"
            history = [kv[seq.block_ids[p // bs]][p % bs][1] for p in range(end)]
            s = seq.sampling
            num_out = len(seq.token_ids) - seq.num_prompt
            suppress = set(s.suppress_token_ids) if num_out < s.min_tokens else ()
            seed = s.seed if s.temperature > 0 else None
            if s.temperature > 0 and seed is None:
                seed = self.rng.randrange(2**31)      # unseeded sampling: depends on the batch
            tok, lp = toy_next(history, seed, suppress)
            out.seq_ids.append(x.seq_id)
            out.token_ids.append(tok)
            out.logprobs.append(lp)
            out.top_logprobs.append(None if s.logprobs is None else toy_top(tok, lp, s.logprobs))
        self.max_tokens_per_step = max(self.max_tokens_per_step, step.num_tokens)
        return out

    def shutdown(self) -> None:
        self.shut = True
