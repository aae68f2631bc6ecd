"""A client of a running `shardline serve` application, through the Python handle (no HTTP).

    shardline serve --detach --name shardline          # on a `ray start --head` cluster (RAY_ADDRESS set)
    python examples/serve_client.py --name shardline   # from any driver attached to the cluster, or:
    ray job submit --working-dir . -- python examples/serve_client.py --name shardline

Generates a small batch, then streams one prompt token by token; with --json prints one JSON
object (token ids and texts) instead.
"""

from __future__ import annotations

import argparse
import json

from cluster import SamplingParams, connect

PROMPTS = ["The capital of Japan is", "def fibonacci(n):"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="shardline", help="the application name given to `shardline serve --name`")
    ap.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--token-ids", default=None, help="comma-separated prompt token ids instead of the text prompts")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    handle = connect(args.name, address=args.address)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    prompts = PROMPTS if args.token_ids is None else [{"prompt_token_ids": [int(t) for t in args.token_ids.split(",")]}]
    outputs = handle.generate(prompts, params)
    if args.json:
        deltas = list(handle.stream(prompts[0], params))
        print(json.dumps({"generate": [o.outputs[0].token_ids for o in outputs],
                          "stream": [t for d in deltas for t in d.outputs[0].token_ids],
                          "replicas": len(handle.stats()["replicas"])}))
        return
    for out in outputs:
        print(f">>> {out.prompt}\n{out.outputs[0].text}  [{out.outputs[0].finish_reason}]")
    print(f">>> {PROMPTS[0]} (streamed)")
    for delta in handle.stream(PROMPTS[0], params):
        print(delta.outputs[0].text, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
