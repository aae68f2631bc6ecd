"""Recovery: how long a replica takes to serve again after one of its workers is killed.

Starts one engine (`--tp` x `--pp`, `--cpus-per-worker` each, on a local Ray), then `--kills`
times: `ray.kill` one worker (a different rank each time), run one short greedy request (which
finds the dead rank and waits for the rebuild), and read the engine's `ReplicaRecovery`
(detection -> the rebuilt replica finished its warm-up) and the executor's `start_phases_s`. The
baseline, measured in the same run, is the engine's own cold start (start-up steps 4-8 for the
whole engine), so the figure is the ratio rebuild / cold start.

    python benchmarks/bench_recovery.py                      # SmolLM2, TP=2 x PP=2, 3 kills
    python benchmarks/bench_recovery.py --model DIR --kills 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root, for `python benchmarks/...`

# isort: off
from benchmarks import common  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads)
# isort: on
import ray  # noqa: E402

from cluster.llm import LLM  # noqa: E402
from scheduler.sampling_params import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=float, default=0.5)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = common.model_path(args.model)
    t0 = time.monotonic()
    llm = LLM(model, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, max_restarts=args.kills,
              cpus_per_worker=args.cpus_per_worker)
    cold_s = time.monotonic() - t0
    cold_phases = dict(llm.executor.start_phases_s)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    runs = []
    try:
        for k in range(args.kills):
            workers = [w for w in llm.executor.workers if w is not None]
            victim = workers[(k + 1) % len(workers)]
            ray.kill(victim.actor)
            llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], params, use_tqdm=False)
            rec = llm.engine.recoveries[-1]
            runs.append({"victim": victim.rank.describe(), "recovery_s": rec.recovery_s,
                         "phases_s": dict(llm.executor.start_phases_s)})
            print(f"kill {k + 1}: {victim.rank.describe()} -> serving again in {rec.recovery_s:.2f} s; phases "
                  + ", ".join(f"{n.strip()} {v:.2f}" for n, v in runs[-1]["phases_s"].items()), flush=True)
    finally:
        llm.shutdown()
    median = statistics.median(r["recovery_s"] for r in runs)
    result = {"cpu": common.cpu_model(), "layout": f"TP={args.tp} x PP={args.pp}, {args.cpus_per_worker} CPU/worker",
              "model": model, "cold_start_s": cold_s, "cold_phases_s": cold_phases, "runs": runs,
              "median_recovery_s": median, "recovery_over_cold_start": median / cold_s}
    print(f"{result['cpu']}, {result['layout']}: cold start {cold_s:.2f} s; median recovery {median:.2f} s "
          f"= {median / cold_s:.2f} x the cold start")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
