"""Where a decode step with many running sequences spends its time, outside and inside the model.

One in-process engine (`LLM` without an address: the local executor, which still goes through
the msgpack codec every step) keeps --seqs sequences decoding; after they are all past their
prompts, --steps engine steps are timed, with the runner's phases timed by wrapping its
methods (nothing outside benchmarks/ changes):

- model: the stage's forward and LM head (`forward_logits` minus the two phases below)
- input prep: the runner's sequence cache update and input/metadata construction
- sampler
- scheduler + executor + transport: everything else in `LLMEngine.step` (scheduling,
  wire encode/decode, applying results, stop checks, detokenization)

    python benchmarks/bench_overhead.py                  # 256 sequences, 10 steps
    python benchmarks/bench_overhead.py --seqs 64 --steps 20
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections import defaultdict

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root, for `python benchmarks/...`

# isort: off
from benchmarks import common  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads)
# isort: on

HEADERS = ["part of a step", "ms/step", "% of step"]


def _timed(obj, attr: str, acc: dict, key: str) -> None:
    fn = getattr(obj, attr)

    def inner(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[key] += time.perf_counter() - t0
    setattr(obj, attr, inner)


def measure(llm, seqs: int, prompt_len: int, steps: int, seed: int) -> dict[str, float]:
    from benchmarks.workload import same_length_prompts
    from cluster import SamplingParams
    engine, runner = llm.engine, llm.executor.runner
    vocab = runner.hf_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=steps + 8 + prompt_len, ignore_eos=True)
    for i, p in enumerate(same_length_prompts(seqs, prompt_len, vocab, seed=seed)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    # until every sequence has its first token (all prompts computed), then two warm-up decodes
    while sum(len(s.running) for s in engine.schedulers) < seqs or any(
            q.is_prefilling for s in engine.schedulers for q in s.running):
        engine.step()
    engine.step(), engine.step()
    acc: dict[str, float] = defaultdict(float)
    _timed(runner, "forward_logits", acc, "forward_logits")
    _timed(runner, "_update_cache", acc, "update_cache")
    _timed(runner, "_prepare", acc, "prepare")
    _timed(runner, "sampler", acc, "sampler")
    start = time.perf_counter()
    for _ in range(steps):
        n = engine.max_batch_seqs
        engine.step()
    total = time.perf_counter() - start
    prep = acc["update_cache"] + acc["prepare"]
    model = acc["forward_logits"] - prep
    other = total - acc["forward_logits"] - acc["sampler"]
    return {"step": total / steps, "model": model / steps, "input prep": prep / steps,
            "sampler": acc["sampler"] / steps, "scheduler + executor + transport": other / steps,
            "batch": n}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", help="HF model folder (default: the bundled SmolLM2, converted once)")
    ap.add_argument("--seqs", type=int, default=256, help="running sequences (default: 256)")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence (default: 16)")
    ap.add_argument("--steps", type=int, default=10, help="timed engine steps (default: 10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", help="append the markdown result to this file")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.set_threads(args.threads)
    from cluster import LLM
    model = common.model_path(args.model)
    llm = LLM(model, max_num_seqs=args.seqs, max_num_batched_tokens=max(2048, args.seqs * args.prompt_len))
    try:
        r = measure(llm, args.seqs, args.prompt_len, args.steps, args.seed)
    finally:
        llm.shutdown()
    parts = ["model", "input prep", "sampler", "scheduler + executor + transport"]
    text = "\n".join([
        f"## Step breakdown at {args.seqs} running sequences (bench_overhead.py)", "",
        f"Model {model}; {args.steps} decode steps of {args.seqs} sequences ({args.prompt_len}-token prompts), "
        f"local executor (msgpack codec every step); {args.threads} threads; {common.machine_line()}.", "",
        common.markdown_table(HEADERS, [(p, 1e3 * r[p], f"{100 * r[p] / r['step']:.1f}%") for p in parts]
                              + [("whole step", 1e3 * r["step"], "100%")]),
    ])
    print(text)
    common.write_result(args.output, text)
    return r


if __name__ == "__main__":
    main()
