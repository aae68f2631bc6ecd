"""Offline batch generation with the bundled SmolLM2 model, split into two pipeline stages on Ray.

    python examples/offline_generate.py [--model DIR] [--tp 1] [--pp 2] [--dp 1] [--max-tokens 48]

With no RAY_ADDRESS a local Ray cluster starts (and stops) inside this script; with one, the
script joins that cluster.
"""

from __future__ import annotations

import argparse
import time

from cluster import LLM, SamplingParams
from cluster.model_prep import prepare_model

PROMPTS = [
    "The three primary colours are",
    "Write a haiku about distributed systems:",
    "def fibonacci(n):",
    "The capital of Japan is",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model folder (default: the bundled SmolLM2, prepared on demand)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    ap.add_argument("--pp", type=int, default=2, help="pipeline-parallel size")
    ap.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()

    model = args.model or str(prepare_model())
    start = time.perf_counter()
    with LLM(model, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
             data_parallel_size=args.dp) as llm:
        print(f"engine up in {time.perf_counter() - start:.1f}s (tp={args.tp} pp={args.pp} dp={args.dp})")
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
        for out in outputs:
            print(f"\n>>> {out.prompt}\n{out.outputs[0].text}  [{out.outputs[0].finish_reason}]")
        chat = llm.chat([{"role": "user", "content": "In one sentence, what is pipeline parallelism?"}],
                        SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
        print(f"\n>>> chat\n{chat[0].outputs[0].text}")


if __name__ == "__main__":
    main()
