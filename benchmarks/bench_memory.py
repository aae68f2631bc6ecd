"""Memory per rank: weight bytes, KV-cache bytes and RSS (now and peak) of every rank of each layout.

For each model and layout, `LLM(...)` is started, a short batch is generated (so every rank has
written its KV cache and run its activations), and then every rank is asked:

- weight bytes: the bytes its loader read from the safetensors files (`loaded_bytes`, reported
  by the rank itself when it loaded its shard);
- KV-cache bytes: the rank's cache tensors, K and V of its own layers and KV heads
  (KV blocks x block size x layers x KV heads x head dim x 2 x dtype bytes, from the `ShardPlan`);
- RSS and peak RSS (`VmRSS` / `VmHWM` of the rank's process) and its anonymous part (`RssAnon`:
  the process's private memory, without the safetensors pages the OS mapped from the page cache).
  Every layout runs on Ray workers (the single rank too, with --threads CPUs), one layout at a
  time, and each rank's numbers are read on its own node by a Ray task pinned there.

RSS includes the Python interpreter, torch and Ray's worker runtime (a few hundred MB per process);
compare the weight and KV columns across layouts, and read RSS as what a rank really costs.

    python benchmarks/bench_memory.py            # SmolLM2 and the tiny Llama: single, PP=2, TP=2/3, DP=2
    python benchmarks/bench_memory.py --quick    # tiny Llama only
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root, for `python benchmarks/...`

# isort: off
from benchmarks import common  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads)
# isort: on
from benchmarks.bench_ray import LAYOUTS, start_ray  # noqa: E402
from benchmarks.workload import same_length_prompts  # noqa: E402

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADERS = ["model", "layout", "rank (dp, pp, tp)", "weights MB", "KV cache MB", "RSS MB", "peak RSS MB",
           "private (anon) MB"]


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """{'rss', 'peak_rss', 'rss_anon'} in bytes, from /proc/PID/status (Linux)."""
    fields = {"VmRSS": "rss", "VmHWM": "peak_rss", "RssAnon": "rss_anon"}
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in fields:
                out[fields[key]] = int(line.split()[1]) * 1024   # reported in kB
    return out


def ask_ranks_memory(executor) -> dict[int, dict[str, int]]:
    """pid -> proc_memory of every Ray rank, each read on its own node by a task pinned there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def read(pid: int) -> dict[str, int]:   # nested: Ray ships it by value, no import on the node
        return proc_memory(pid)
    remote = ray.remote(num_cpus=0)(read)
    refs = {w.pid: remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(w.node_id, soft=False))
            .remote(w.pid) for w in executor.workers if w is not None}
    return dict(zip(refs, ray.get(list(refs.values()), timeout=60)))


def kv_cache_bytes(plan, num_kv_blocks: int, block_size: int, dtype: str, pp_rank: int, tp_rank: int) -> int:
    """Bytes of one rank's KV cache: K and V for its layers and its KV heads (see sharding.runner)."""
    per_layer = 2 * num_kv_blocks * block_size * len(plan.kv_heads(tp_rank)) * plan.dims.head_dim
    return per_layer * len(plan.layers(pp_rank)) * DTYPE_BYTES[dtype]


def rank_rows(llm) -> list[dict]:
    """One dict per rank of `llm`: where it is, weight / KV / RSS bytes."""
    ex, cfg = llm.executor, llm.config
    info = {i["pid"]: i for i in ex.worker_info}
    mem = ask_ranks_memory(ex)
    rows = []
    for w in sorted((w for w in ex.workers if w is not None), key=lambda w: w.rank.global_rank):
        i = info[w.pid]
        rows.append({"replica": w.rank.replica, "pp_rank": w.rank.pp_rank, "tp_rank": w.rank.tp_rank, "pid": w.pid,
                     "weight_bytes": i["loaded_bytes"],
                     "kv_cache_bytes": kv_cache_bytes(ex.plan, i["num_kv_blocks"], cfg.block_size, cfg.dtype,
                                                      w.rank.pp_rank, w.rank.tp_rank),
                     **mem[w.pid]})
    return rows


def measure_layout(model: str, layout: str, args) -> dict:
    from cluster import LLM, SamplingParams
    tp, pp, dp = LAYOUTS[layout]
    # every layout, the single rank included, runs as Ray workers so each rank is its own process;
    # the single rank gets --threads CPUs (threads), the others 1 each
    cpus = float(args.threads) if tp * pp * dp == 1 else 1.0
    vocab = json.loads((pathlib.Path(model) / "config.json").read_text())["vocab_size"]
    with LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp, max_model_len=256,
             kv_cache_memory=int(args.kv_cache_mb * 2**20), cpus_per_worker=cpus, address=args.address) as llm:
        prompts = [{"prompt_token_ids": p} for p in same_length_prompts(args.batch, args.prompt_len, vocab)]
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True),
                     use_tqdm=False)
        return {"layout": layout, "ranks": rank_rows(llm)}


def bench_model(name: str, model: str, args) -> dict:
    from sharding.plan import LayoutError, check_layout
    out, invalid = [], {}
    from tqdm.auto import tqdm
    for layout in tqdm(["single", *args.layouts], desc=f"{name} layouts", file=sys.stderr):
        tp, pp, _ = LAYOUTS[layout]
        try:
            check_layout(model, tp, pp)
        except LayoutError as e:
            invalid[layout] = str(e).split(";")[0]
            continue
        out.append(measure_layout(model, layout, args))
    return {"model": name, "layouts": out, "invalid": invalid}


def tables(results: list[dict], args) -> str:
    mb = lambda b: b / 1e6
    rows = [(r["model"], lay["layout"], f"({k['replica']}, {k['pp_rank']}, {k['tp_rank']})", mb(k["weight_bytes"]),
             mb(k["kv_cache_bytes"]), mb(k["rss"]), mb(k["peak_rss"]), mb(k.get("rss_anon", 0)))
            for r in results for lay in r["layouts"] for k in lay["ranks"]]
    text = ["## Memory per rank (bench_memory.py)", "",
            f"After generating {args.batch} x {args.prompt_len}-token prompts, {args.max_tokens} tokens each; KV cache "
            f"budget {args.kv_cache_mb:g} MiB per rank. Weights: bytes the rank's loader read; KV cache: the rank's "
            "K/V tensors; RSS / peak RSS: VmRSS / VmHWM of the rank's process (interpreter, torch and Ray included); "
            f"private: RssAnon. {common.machine_line()}.", "", common.markdown_table(HEADERS, rows)]
    for r in results:
        for lay, why in r["invalid"].items():
            text.append(f"\n{lay} is not a valid layout for {r['model']}: {why}.")
    return "\n".join(text)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", help="real model folder (default: the bundled SmolLM2, converted once)")
    ap.add_argument("--models", nargs="+", choices=["smollm2", "tiny"], help="default: smollm2 tiny; --quick: tiny")
    ap.add_argument("--layouts", nargs="+", choices=[lay for lay in LAYOUTS if lay != "single"],
                    help="layouts besides the single rank (default: PP=2 TP=2 TP=3 DP=2; an invalid one for a model "
                    "is reported and skipped)")
    ap.add_argument("--batch", type=int, default=8, help="requests generated before measuring (default: 8)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--kv-cache-mb", type=float, default=256, help="KV cache budget per rank in MiB (default: 256)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the single rank (default: 2)")
    ap.add_argument("--quick", action="store_true", help="tiny model only, layouts PP=2 TP=2 DP=2")
    ap.add_argument("--output", help="append the markdown result to this file")
    ap.add_argument("--json", help="write the numbers as JSON to this file")
    args = ap.parse_args(argv)
    if args.models is None:
        args.models = ["tiny"] if args.quick else ["smollm2", "tiny"]
    if args.layouts is None:
        args.layouts = ["PP=2", "TP=2", "DP=2"] if args.quick else ["PP=2", "TP=2", "TP=3", "DP=2"]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.set_threads(args.threads)
    print(common.machine_line(), file=sys.stderr)
    # one layout alive at a time; the single rank reserves --threads CPUs
    start_ray(num_cpus=max(args.threads, *(math.prod(LAYOUTS[lay]) for lay in args.layouts)))
    import ray
    args.address = ray.get_runtime_context().gcs_address
    try:
        results = common.bench_models(args.models, args.model, lambda name, path: bench_model(name, path, args))
    finally:
        ray.shutdown()
    text = tables(results, args)
    print(text)
    common.write_result(args.output, text)
    data = {"benchmark": "memory", "results": results}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(data, indent=1))
    return data


if __name__ == "__main__":
    main()
