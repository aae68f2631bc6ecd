"""PP=2 with more micro-batches per step: does filling the pipeline bubble pay? (benchmarks/NOTES.md 5b)

The scheduler splits each step's batch into P micro-batches (P = pipeline stages). This runs one
rank and PP=2 engines with 1, 2 and 4 micro-batches per stage (P, 2P, 4P per step) side by side,
all alive at once, their decode steps interleaved (`bench_ray.DecodeRun`), and prints each
step time and single/PP ratio. The factor is `Scheduler.micro_batches_per_stage`, set on each PP
engine's schedulers here only (engines use 1); the PP engines run fill-and-drain
(`pipeline_overlap=False`), as when NOTES 5b was measured.

    python benchmarks/bench_microbatches.py [--batch 64] [--reps 5]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root

# isort: off
from benchmarks import common  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads)
# isort: on
from benchmarks import bench_ray  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args(argv)
    run_args = argparse.Namespace(batches=[args.batch], prompt_len=32, warmup=2, reps=args.reps, steps=3)
    common.set_threads(2)
    bench_ray.start_ray(8)
    model = common.model_path(None)
    llms = {"single": bench_ray.start_layout(model, 1, 1, run_args)[0]}
    try:
        for m in args.factors:
            # the fill-and-drain engine NOTES 5b measured (the pipelined one splits a step by lanes)
            llm = bench_ray.start_layout(model, 1, 2, run_args, pipeline_overlap=False)[0]
            for s in llm.engine.schedulers:
                s.micro_batches_per_stage = m
            llms[f"PP=2, {2 * m} micro-batches"] = llm
        runs = {k: bench_ray.DecodeRun(llm, args.batch, run_args, k) for k, llm in llms.items()}
        res = common.interleaved({k: (lambda r=r: r.time_steps(run_args.steps)) for k, r in runs.items()},
                                 args.reps)
    finally:
        for llm in llms.values():
            llm.shutdown()
    single = common.median(res["single"])
    print(common.machine_line(), f"(load average now {os.getloadavg()[0]:.1f})")
    print(common.markdown_table(["engine", "ms/step (median)", "single / this"],
                                [[k, round(common.median(v) * 1e3, 1), round(single / common.median(v), 2)]
                                 for k, v in res.items()]))


if __name__ == "__main__":
    main()
