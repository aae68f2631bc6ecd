"""The Ray Data batch job against offline `LLM.generate` on the same rows, and the pre-flight time.

Same run, same local Ray (started once, workers at nice 0), same layout (PP=--pp on Ray), same
rows (--rows prompts from the seeded workload, greedy, --max-tokens each):

- offline:  `LLM(model, pipeline_parallel_size=P)` then one `generate` over all rows; timed with
            and without the engine start-up;
- ray data: `examples/batch_ray_data.py`'s `main` (read_json -> map_batches over one engine
            actor -> write_json) into a fresh output folder; its time includes the engine's
            start-up inside the actor and Ray Data's scheduling and writing;
- preflight: `run_preflight(model, 1, P)` on this one-node cluster (placement, probes, checks,
            collectives).

Throughput = output tokens / wall seconds. Writes benchmarks/results/batch_ray_data.{json,md}.

    python benchmarks/bench_batch_ray_data.py [--model DIR] [--rows 32] [--max-tokens 32] [--pp 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root

# isort: off
from benchmarks import common  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads)
# isort: on

RESULTS = common.REPO_ROOT / "benchmarks" / "results"


def load_job():
    spec = importlib.util.spec_from_file_location("batch_ray_data", common.REPO_ROOT / "examples" / "batch_ray_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["batch_ray_data"] = module
    spec.loader.exec_module(module)
    import ray
    ray.cloudpickle.register_pickle_by_value(module)   # shipped like a job's __main__
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--out", default=None, help="append the markdown here too (run_all.py)")
    args = ap.parse_args()
    model = common.model_path(args.model)
    machine = common.machine_line()

    import ray

    from cluster import LLM, SamplingParams
    from cluster.preflight import run_preflight
    from cluster.ray_connect import keep_ray_on_loopback

    keep_ray_on_loopback()
    os.environ["RAY_worker_niceness"] = "0"
    t0 = time.perf_counter()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"PYTHONPATH": str(common.REPO_ROOT)}})
    ray_start = time.perf_counter() - t0
    job = load_job()
    prompts = [f"Write one sentence about topic number {i}: " + "the sea, " * (i % 7) for i in range(args.rows)]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench-batch-"))
    (tmp / "in.jsonl").write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    try:
        pre = run_preflight(model, 1, args.pp, timeout_s=120)
        assert pre.ok, pre.table()

        t0 = time.perf_counter()
        with LLM(model, pipeline_parallel_size=args.pp) as llm:
            t1 = time.perf_counter()
            outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)
            t2 = time.perf_counter()
        offline_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        offline_texts = {i: o.outputs[0].text for i, o in enumerate(outs)}

        t3 = time.perf_counter()
        job.main(["--model", model, "--input", str(tmp / "in.jsonl"), "--output", str(tmp / "out"),
                  "--pipeline-parallel-size", str(args.pp), "--max-tokens", str(args.max_tokens),
                  "--batch-size", "16"])
        data_s = time.perf_counter() - t3
        rows = [json.loads(line) for f in (tmp / "out").rglob("*.json") for line in f.read_text().splitlines()]
        data_tokens = sum(r["output_tokens"] for r in rows)
        same = sum(offline_texts[r["id"]] == r["text"] for r in rows)
    finally:
        ray.shutdown()

    res = {"machine": machine, "model": model, "rows": args.rows, "max_tokens": args.max_tokens, "pp": args.pp,
           "ray_start_s": ray_start, "preflight_s": pre.seconds,
           "offline_total_s": t2 - t0, "offline_generate_s": t2 - t1, "offline_tokens": offline_tokens,
           "ray_data_s": data_s, "ray_data_tokens": data_tokens, "ray_data_rows": len(rows), "texts_equal": same}
    tput = {"offline generate only": offline_tokens / (t2 - t1),
            "offline incl. engine start": offline_tokens / (t2 - t0),
            "ray data job (incl. engine start)": data_tokens / data_s}
    base = tput["offline incl. engine start"]
    table = common.markdown_table(["system", "output tokens/s", "ratio to offline incl. start"],
                                  [(k, v, v / base) for k, v in tput.items()])
    md = (f"### Ray Data batch job vs offline LLM.generate (PP={args.pp}, {args.rows} rows, {args.max_tokens} "
          f"tokens, greedy)\n\n{machine}\n\n{table}\n\nrows written {len(rows)}/{args.rows}, texts equal to "
          f"offline: {same}/{len(rows)}; pre-flight on this 1-node cluster: {pre.seconds:.1f} s; Ray start "
          f"{ray_start:.1f} s\n")
    print(md)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "batch_ray_data.json").write_text(json.dumps({**res, "tokens_per_s": tput}, indent=2))
    (RESULTS / "batch_ray_data.md").write_text(md)
    common.write_result(args.out, md)


if __name__ == "__main__":
    main()
