"""Ray layouts against a single rank: decode step time of PP=2, TP=2/3/4 and DP=2, and start-up time.

Same run, two models: the bundled SmolLM2 (9 heads, 3 KV heads: TP=2 and TP=4 are uneven
layouts, TP=3 an even one) and a tiny random Llama with 8 heads (tests/fixtures/tiny_models.py).
For each model every layout is started once and kept alive, then measured in interleaved rounds:

- single: `LLM(model)`, one rank in this process, 2 torch threads (--threads);
- PP=2:   `LLM(model, pipeline_parallel_size=2)`, two Ray workers of 1 CPU = 1 thread each;
  the sequences are split into 2 lanes, one micro-batch of each always in flight
  (`scheduler.pipelined`);
- PP=2-drain: the same with `pipeline_overlap=False`: each step's batch is split into 2
  micro-batches and the pipeline drains before the next step;
- TP=T:   `LLM(model, tensor_parallel_size=T)`, T Ray workers of 1 thread each (with more
  workers than cores, TP=3 and TP=4 share the cores: compare them on a machine with >= T cores);
- DP=2:   `LLM(model, data_parallel_size=2)`, two whole-model replicas of 1 thread each; the engine
  splits each step's batch between them.

Each layout's imbalance (the `ShardPlan`'s max / mean per-rank FLOPs and KV bytes) is reported
next to its step time.

Step time: B requests with --prompt-len-token prompts are prefilled and decoded a few steps
(untimed), then rounds of --steps engine steps (each gives every sequence one token) are timed,
the layouts rotating within each round; medians over rounds; ratios are single / layout (above
1: the layout is faster). Start-up: wall time from `LLM(...)` to the first token of a 1-token
request; Ray itself is started once up front (with enough logical CPUs for every layout to stay
alive at once, and its workers at nice 0 like this process, see `start_ray`) and its start
time is reported separately.

    python benchmarks/bench_ray.py                    # both models, batches 1 32 64
    python benchmarks/bench_ray.py --quick            # tiny model only, batches 1 4
    python benchmarks/bench_ray.py --models smollm2 --layouts TP=2 TP=3 --batches 1 16   # uneven vs even
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root, for `python benchmarks/...`

# isort: off
from benchmarks import common  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads)
# isort: on
from benchmarks.workload import same_length_prompts  # noqa: E402

LAYOUTS = {"single": (1, 1, 1), "PP=2": (1, 2, 1), "PP=2-drain": (1, 2, 1), "TP=2": (2, 1, 1), "TP=3": (3, 1, 1),
           "TP=4": (4, 1, 1), "DP=2": (1, 1, 2)}   # name -> (tp, pp, dp)
OPTIONS = {"PP=2-drain": {"pipeline_overlap": False}}   # name -> extra LLM keywords


def start_ray(num_cpus: int) -> float:
    """Start a private local Ray (never joins another cluster); seconds taken.

    Ray runs worker processes at nice 15 by default (its `worker_niceness`), so on a machine
    shared with other nice-0 processes the Ray ranks would get a fraction of the CPU the
    in-process single rank gets (measured here: PP=2 20x slower than one rank at batch 2).
    Both sides run at nice 0 unless RAY_worker_niceness is already set.
    """
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_worker_niceness", "0")
    try:   # bind loopback, as the executor does when it starts Ray itself
        from cluster.ray_connect import keep_ray_on_loopback
        keep_ray_on_loopback()
    except ImportError:
        pass
    import logging

    import ray
    start = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, _node_ip_address="127.0.0.1")
    return time.perf_counter() - start


def start_layout(model: str, tp: int, pp: int, args, dp: int = 1, **options) -> tuple[object, float]:
    """(LLM, seconds from LLM(...) to the first token of a 1-token request)."""
    from cluster import LLM, SamplingParams
    vocab = json.loads((pathlib.Path(model) / "config.json").read_text())["vocab_size"]
    start = time.perf_counter()
    extra = ({} if tp * pp * dp == 1 else {"cpus_per_worker": 1.0}) | options
    llm = LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp,
              max_num_seqs=max(args.batches),
              max_num_batched_tokens=max(2048, max(args.batches) * args.prompt_len), max_model_len=256, **extra)
    llm.generate([{"prompt_token_ids": same_length_prompts(1, 8, vocab, seed=99)[0]}],
                 SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    return llm, time.perf_counter() - start


class DecodeRun:
    """B running requests on one LLM, stepped by hand through its engine."""

    def __init__(self, llm, batch: int, args, tag: str):
        from cluster import SamplingParams
        self.engine = llm.engine
        vocab = json.loads((pathlib.Path(llm.config.model) / "config.json").read_text())["vocab_size"]
        prompts = same_length_prompts(batch, args.prompt_len, vocab, seed=1000 + batch)
        total = args.warmup + (args.reps + 1) * args.steps   # never finishes while timed
        self.rids = [f"{tag}-b{batch}-{i}" for i in range(batch)]
        for rid, p in zip(self.rids, prompts):
            self.engine.add_request(rid, p, SamplingParams(temperature=0, max_tokens=total, ignore_eos=True))
        counts = dict.fromkeys(self.rids, 0)
        while min(counts.values()) < args.warmup:   # prefill + warm-up decode, untimed
            for o in self.engine.step():
                counts[o.request_id] = len(o.outputs[0].token_ids)

    def time_steps(self, steps: int) -> float:
        """Seconds per `steps` x batch tokens / batch. A pipelined engine's step returns one lane's
        tokens: it steps until as many tokens came back, then drains (nothing left running)."""
        start = time.perf_counter()
        produced, want = 0, steps * len(self.rids)
        while produced < want:
            produced += len(self.engine.step())
        if hasattr(self.engine, "drain"):
            produced += len(self.engine.drain())
        return (time.perf_counter() - start) / (produced / len(self.rids))

    def close(self) -> None:
        for rid in self.rids:
            self.engine.abort_request(rid)
        while self.engine.has_unfinished_requests():
            self.engine.step()


def bench_model(name: str, model: str, args) -> dict:
    from sharding.plan import LayoutError, check_layout
    llms, startup, invalid, imbalance = {}, {}, {}, {}
    for layout, (tp, pp, dp) in LAYOUTS.items():
        if layout not in args.layouts and layout != "single":
            continue
        try:
            imb = check_layout(model, tp, pp).imbalance()
            imbalance[layout] = {"flops": imb.flops, "kv_bytes": imb.kv_bytes}
        except LayoutError as e:
            invalid[layout] = str(e).split(";")[0]
            continue
        print(f"{name}: starting {layout}", file=sys.stderr)
        llms[layout], startup[layout] = start_layout(model, tp, pp, args, dp, **OPTIONS.get(layout, {}))
    from tqdm.auto import tqdm
    steps: dict[int, dict[str, float]] = {}
    try:
        for batch in tqdm(args.batches, desc=f"{name} batches", file=sys.stderr):
            runs = {layout: DecodeRun(llm, batch, args, f"{layout}") for layout, llm in llms.items()}
            res = common.interleaved({layout: (lambda r=r: r.time_steps(args.steps)) for layout, r in runs.items()},
                                     args.reps)
            steps[batch] = {layout: common.median(v) for layout, v in res.items()}
            for r in runs.values():
                r.close()
    finally:
        for llm in llms.values():
            llm.shutdown()
    return {"model": name, "path": model, "step_s": steps, "startup_s": startup, "invalid": invalid,
            "imbalance": imbalance}


def tables(results: list[dict], ray_start_s: float, args) -> str:
    out = ["## Ray layouts against a single rank (bench_ray.py)", "",
           f"Decode step time (every sequence gets one token), {args.prompt_len}-token prompts, median of "
           f"{args.reps} interleaved rounds of {args.steps} steps. single = one rank in-process with "
           f"{args.threads} threads; PP=2 / TP=T / DP=2 = 2 / T / 2 Ray workers with 1 thread each. "
           f"Ratio = single / layout (above 1: the layout is faster). {common.machine_line()}.", ""]
    for r in results:
        layouts = [lay for lay in LAYOUTS if lay in args.layouts or lay == "single"]
        headers = ["batch"] + [f"{lay} ms/step" for lay in layouts] + [f"single/{lay}" for lay in layouts[1:]]
        rows = []
        for batch, st in r["step_s"].items():
            row = [batch] + [1e3 * st[lay] if lay in st else "n/a" for lay in layouts]
            row += [st["single"] / st[lay] if lay in st else "n/a" for lay in layouts[1:]]
            rows.append(row)
        out += [f"### {r['model']}", "", common.markdown_table(headers, rows), ""]
        for lay, why in r["invalid"].items():
            out.append(f"{lay} is not a valid layout for {r['model']}: {why}.")
        imb = r.get("imbalance", {})
        out += ["", "Imbalance (max / mean over ranks; 1 = even):", "",
                common.markdown_table(["layout", "FLOPs", "KV bytes"],
                                      [(lay, v["flops"], v["kv_bytes"]) for lay, v in imb.items()]), ""]
    out += ["### Start-up: LLM(...) to the first token", "",
            f"Ray was started once up front in {ray_start_s:.1f} s (not included below), with "
            f"RAY_worker_niceness={os.environ.get('RAY_worker_niceness')}.", ""]
    rows = [(r["model"], lay, s) for r in results for lay, s in r["startup_s"].items()]
    out.append(common.markdown_table(["model", "layout", "seconds"], rows))
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", help="real model folder (default: the bundled SmolLM2, converted once)")
    ap.add_argument("--models", nargs="+", default=["smollm2", "tiny"], choices=["smollm2", "tiny"])
    ap.add_argument("--layouts", nargs="+", choices=[lay for lay in LAYOUTS if lay != "single"],
                    help="layouts against the single rank (default: PP=2 PP=2-drain TP=2 TP=3 DP=2; --quick: PP=2 "
                    "PP=2-drain TP=2 DP=2)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 64])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="engine steps per timed round (default: 8)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved rounds (default: 3)")
    ap.add_argument("--warmup", type=int, default=3, help="tokens per sequence before timing (default: 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the single rank (default: 2)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny model, batches 1 and 4, 2 rounds, "
                    "no TP=3")
    ap.add_argument("--output", help="append the markdown result to this file")
    ap.add_argument("--json", help="write the numbers as JSON to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.steps, args.reps = ["tiny"], [1, 4], 4, 2
    if args.layouts is None:
        args.layouts = ["PP=2", "PP=2-drain", "TP=2", "DP=2"] if args.quick else ["PP=2", "PP=2-drain", "TP=2",
                                                                                  "TP=3", "DP=2"]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.set_threads(args.threads)
    print(common.machine_line(), file=sys.stderr)
    # every Ray layout stays alive during the interleaved rounds: tp x pp workers x 1 logical CPU each
    ray_start_s = start_ray(num_cpus=sum(math.prod(LAYOUTS[lay]) for lay in args.layouts))
    try:
        results = common.bench_models(args.models, args.model, lambda name, path: bench_model(name, path, args))
    finally:
        import ray
        ray.shutdown()
    text = tables(results, ray_start_s, args)
    print(text)
    common.write_result(args.output, text)
    data = {"benchmark": "ray", "ray_start_s": ray_start_s,
            "results": [{k: v for k, v in r.items() if k != "path"} for r in results]}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(data, indent=1))
    return data


if __name__ == "__main__":
    main()
