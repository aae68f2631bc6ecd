"""The seeded synthetic workload every benchmark uses, so runs are comparable across commits.

A request is random token ids plus an output length, drawn from `random.Random(seed)`:

- prompt length: uniform integer in [min_prompt, max_prompt] (default 8..512);
- output length: uniform integer in [min_output, max_output] (default 8..256);
- prompt tokens: uniform over [FIRST_ID, vocab_size), skipping the low ids where SmolLM2 (and
  most tokenizers) keep special tokens, so no prompt contains an EOS or a chat marker.

Outputs are forced to their length (`ignore_eos=True` in Shardline, `min_new_tokens` in HF),
so the work done does not depend on what the model says. With the defaults and seed 0, 128
requests hold 30,985 prompt tokens and 16,654 output tokens.

    >>> reqs = make_requests(4, vocab_size=49152, seed=0)
    >>> [(len(r.prompt_token_ids), r.max_tokens) for r in reqs]   # always the same for seed 0
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

SEED = 0
FIRST_ID = 32  # below this: special tokens in SmolLM2's tokenizer (0..16) and some margin


@dataclass(frozen=True)
class Request:
    prompt_token_ids: list[int]
    max_tokens: int   # exact output length (generation never stops early)


def make_requests(num: int, vocab_size: int, seed: int = SEED, min_prompt: int = 8, max_prompt: int = 512,
                  min_output: int = 8, max_output: int = 256) -> list[Request]:
    """`num` requests drawn from `random.Random(seed)`; the same arguments give the same requests."""
    if not 0 < min_prompt <= max_prompt or not 0 < min_output <= max_output:
        raise ValueError("need 0 < min_prompt <= max_prompt and 0 < min_output <= max_output")
    if vocab_size <= FIRST_ID:
        raise ValueError(f"vocab_size={vocab_size} must exceed FIRST_ID={FIRST_ID}")
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        plen = rng.randint(min_prompt, max_prompt)
        olen = rng.randint(min_output, max_output)
        out.append(Request([rng.randrange(FIRST_ID, vocab_size) for _ in range(plen)], olen))
    return out


def same_length_prompts(batch: int, length: int, vocab_size: int, seed: int = SEED) -> list[list[int]]:
    """`batch` random prompts of exactly `length` tokens (the decode benchmark's batches)."""
    rng = random.Random(seed)
    return [[rng.randrange(FIRST_ID, vocab_size) for _ in range(length)] for _ in range(batch)]


def summary(reqs: list[Request]) -> str:
    p = [len(r.prompt_token_ids) for r in reqs]
    o = [r.max_tokens for r in reqs]
    return (f"{len(reqs)} requests, prompt {min(p)}-{max(p)} (sum {sum(p)}), "
            f"output {min(o)}-{max(o)} (sum {sum(o)}) tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description="Print a summary of the seeded benchmark workload.")
    ap.add_argument("--num", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=49152)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    print(summary(make_requests(args.num, args.vocab_size, args.seed)))


if __name__ == "__main__":
    main()
