"""Recovery: how long a replica takes to serve again after one of its workers fails.

For each mode (`--modes`, default both in one run): start one engine (`--tp` x `--pp`,
`--cpus-per-worker` each, on a local Ray), then `--kills` times fail one worker (a different rank
each time) and run one short greedy request, which finds the failed rank and waits for the
rebuild; read the engine's `ReplicaRecovery` (detection -> the rebuilt replica finished its
warm-up) and the executor's `start_phases_s`. Modes: `cold` starts new worker processes;
`standby` (`standby_workers=True`) takes over the replica's idle standby actors. Faults
(`--fault`): `kill` (`ray.kill`, found at once) or `stop` (SIGSTOP: found by the step deadline,
`--step-timeout`, so fault -> serving again is that deadline + the rebuild). The baselines,
measured in the same run: the engine's own cold start, and the cold mode's rebuild.

    python benchmarks/bench_recovery.py                      # SmolLM2, TP=2 x PP=2, 3 kills, both modes
    python benchmarks/bench_recovery.py --model DIR --fault stop --json out.json
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
    ap.add_argument("--modes", nargs="+", choices=("cold", "standby"), default=["cold", "standby"])
    ap.add_argument("--fault", choices=("kill", "stop"), default="kill")
    ap.add_argument("--step-timeout", type=float, default=4.0, help="step_timeout_s (the deadline a stop needs)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model = common.model_path(args.model)
    result = {"cpu": common.cpu_model(), "layout": f"TP={args.tp} x PP={args.pp}, {args.cpus_per_worker} CPU/worker",
              "model": model, "fault": args.fault, "step_timeout_s": args.step_timeout, "modes": {}}
    for mode in args.modes:
        result["modes"][mode] = run_mode(model, args, standby=mode == "standby")
    for mode, r in result["modes"].items():
        ratio = (f"; {r['median_recovery_s'] / result['modes']['cold']['median_recovery_s']:.2f} x the cold rebuild"
                 if mode != "cold" and "cold" in result["modes"] else "")
        print(f"{result['cpu']}, {result['layout']}, {mode}: cold start {r['cold_start_s']:.2f} s; median rebuild "
              f"{r['median_recovery_s']:.2f} s, fault -> serving {r['median_fault_to_serving_s']:.2f} s{ratio}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=2))


def standby_memory(llm) -> dict:
    """Median memory of the waiting standby processes (this node's): USS = what each one alone holds."""
    import psutil

    pids = [ray.get(a.ping.remote())["pid"] for a in llm.executor.standby.actors.values()]
    infos = [psutil.Process(p).memory_full_info() for p in pids]
    return {"uss_mib": statistics.median(i.uss for i in infos) / 2**20,
            "rss_mib": statistics.median(i.rss for i in infos) / 2**20}


def run_mode(model: str, args, standby: bool) -> dict:
    t0 = time.monotonic()
    llm = LLM(model, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, max_restarts=args.kills,
              cpus_per_worker=args.cpus_per_worker, step_timeout_s=args.step_timeout, standby_workers=standby)
    cold_s = time.monotonic() - t0
    cold_phases = dict(llm.executor.start_phases_s)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    runs = []
    try:
        for k in range(args.kills):
            if standby:   # a rebuild finds its standbys started (they start in the background after each one)
                llm.executor.standby.wait_full(300.0)
                if k == 0:
                    memory = standby_memory(llm)
            workers = [w for w in llm.executor.workers if w is not None]
            victim = workers[(k + 1) % len(workers)]
            t_fault = time.monotonic()
            if args.fault == "kill":
                ray.kill(victim.actor)
            else:
                ray.get(victim.actor.inject_fault.remote("stop", 1))
            llm.generate([{"prompt_token_ids": [5, 6, 7, 8]}], params, use_tqdm=False)
            rec = llm.engine.recoveries[-1]
            runs.append({"victim": victim.rank.describe(), "recovery_s": rec.recovery_s,
                         "fault_to_serving_s": rec.recovered_at - t_fault,
                         "phases_s": dict(llm.executor.start_phases_s)})
            print(f"{'standby' if standby else 'cold'} {args.fault} {k + 1}: {victim.rank.describe()} -> rebuilt in "
                  f"{rec.recovery_s:.2f} s, serving {runs[-1]['fault_to_serving_s']:.2f} s after the fault; phases "
                  + ", ".join(f"{n.strip()} {v:.2f}" for n, v in runs[-1]["phases_s"].items()), flush=True)
    finally:
        llm.shutdown()
    median = statistics.median(r["recovery_s"] for r in runs)
    if standby:
        print(f"an idle standby holds {memory['uss_mib']:.0f} MiB of its own (USS; RSS {memory['rss_mib']:.0f} MiB)")
    return {"standby_memory_mib": memory if standby else None,
            "cold_start_s": cold_s, "cold_phases_s": cold_phases, "runs": runs, "median_recovery_s": median,
            "median_fault_to_serving_s": statistics.median(r["fault_to_serving_s"] for r in runs),
            "recovery_over_cold_start": median / cold_s}


if __name__ == "__main__":
    main()
