"""How busy each PP=2 stage is, overlapped (`scheduler.pipelined`) and fill-and-drain (benchmarks/NOTES.md 5c).

Runs SmolLM2 at PP=2 with `pipeline_overlap` True, then False (one engine at a time, NOT
interleaved: compare step times with bench_ray.py, which interleaves), decodes --rounds rounds of
8 steps per batch, and reads Ray's task timeline: the share of wall time each worker spends
inside `ShardWorker.execute` (a gloo send/recv wait inside a step counts as busy) and its median
call time.

    python benchmarks/bench_pipeline_busy.py [--batches 32 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root

# isort: off
from benchmarks import common  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads)
# isort: on
from benchmarks import bench_ray  # noqa: E402


def busy(t0: float, t1: float) -> dict[str, tuple[float, float]]:
    """worker -> (share of [t0, t1] inside execute, median execute ms)."""
    import ray
    calls: dict[str, list[float]] = {}
    for e in ray.timeline():
        if e.get("ph") == "X" and e.get("cat", "").endswith("ShardWorker.execute") and t0 <= e["ts"] / 1e6 <= t1:
            calls.setdefault(e["tid"][-6:], []).append(e["dur"] / 1e6)
    return {w: (sum(d) / (t1 - t0), 1e3 * statistics.median(d)) for w, d in calls.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    run_args = argparse.Namespace(batches=[max(args.batches)], prompt_len=32, warmup=3, steps=8,
                                  reps=args.rounds)
    common.set_threads(2)
    bench_ray.start_ray(4)
    rows = []
    for overlap in (True, False):
        llm = bench_ray.start_layout(common.model_path(None), 1, 2, run_args, pipeline_overlap=overlap)[0]
        try:
            for batch in args.batches:
                run = bench_ray.DecodeRun(llm, batch, run_args, f"overlap{overlap}")
                t0 = time.time()
                step = common.median([run.time_steps(run_args.steps) for _ in range(args.rounds)])
                for w, (share, med) in sorted(busy(t0, time.time()).items()):
                    rows.append([overlap, batch, round(step * 1e3), w, round(share, 2), round(med)])
                run.close()
        finally:
            llm.shutdown()
    print(common.machine_line(), f"(load average now {os.getloadavg()[0]:.1f})")
    print(common.markdown_table(["overlap", "batch", "ms/step (median)", "worker", "share in execute",
                                 "median execute ms"], rows))


if __name__ == "__main__":
    main()
