"""Executor -> worker transport: today's per-step actor calls against Ray Compiled Graphs.

Issue 10 asks to evaluate Ray Compiled Graphs (`ray.dag` with shared-memory channels on CPU,
what vLLM's Ray executor uses for pipeline parallelism) against the per-step actor calls of
`cluster.ray_executor`. This measures only the transport, on the real messages: a decode
`StepInput` of B sequences encoded with `scheduler.wire` goes to every worker of a TP x PP
replica, each worker decodes it, and the sampling rank answers with the encoded `StepOutput`
of B tokens. The workers do no model work, so what is timed is exactly the per-step cost the
executor adds on top of the forward pass:

    actor calls      `w.execute.remote(payload)` to every worker, `ray.wait` + `ray.get` (what
                     `RayExecutor` does, including the object-store put for messages > 100 KiB)
    compiled graph   the same workers bound once into a `MultiOutputNode` DAG,
                     `experimental_compile()`, then `ray.get(dag.execute(payload))` per step

Both candidates run interleaved in the same run; the table gives medians, the ratio, and the
transport's share of a decode step of the bundled model (the step time is measured in the same
run by one in-process `LocalExecutor`, batch 1 and the largest batch).

    python benchmarks/bench_transport.py [--workers 1 4] [--batches 1 64 256] [--steps 200] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import common  # sets OMP_WAIT_POLICY, puts the repo on sys.path
from common import REPO_ROOT, interleaved, machine_info, machine_line, markdown_table, median, write_result

INLINE_LIMIT = 100 * 1024   # as cluster.ray_executor: bigger messages go through the object store once


def decode_step(batch: int, context: int = 256, block_size: int = 16):
    """A decode `StepInput` of `batch` running sequences, each appending one token (a new block every 16)."""
    from scheduler.wire import ScheduledSequence, StepInput
    scheduled = [ScheduledSequence(seq_id=i, num_computed=context + i, num_new=1, sample=True,
                                   appended_token_ids=[1000 + i],
                                   new_block_ids=[i] if (context + i) % block_size == 0 else [])
                 for i in range(batch)]
    return StepInput(step_id=7, scheduled=scheduled)


def step_output(batch: int):
    from scheduler.wire import StepOutput
    return StepOutput(step_id=7, seq_ids=list(range(batch)), token_ids=[42] * batch, logprobs=[-0.5] * batch,
                      top_logprobs=[None] * batch)


def make_worker_class():
    import ray

    @ray.remote(num_cpus=0)
    class EchoWorker:
        """Decodes each step message like a `ShardWorker`; the sampling rank answers with a StepOutput."""

        def __init__(self, samples: bool) -> None:
            self.samples = samples

        def execute(self, payload: bytes):
            from scheduler.wire import decode_step_input, encode_step_output
            step = decode_step_input(payload)
            return encode_step_output(step_output(len(step.scheduled))) if self.samples else None

    return EchoWorker


def compiled_graph(workers):
    from ray.dag import InputNode, MultiOutputNode
    with InputNode() as inp:
        dag = MultiOutputNode([w.execute.bind(inp) for w in workers])
    return dag.experimental_compile()


def step_time_ms(model: str, batches: list[int], threads: int, steps: int = 8) -> dict[int, float]:
    """Decode-step milliseconds of the model on one in-process rank, after a 64-token prompt."""
    import random

    from bench_decode import ShardlineDecoder  # noqa: PLC0415 - only when asked for
    common.set_threads(threads)
    out = {}
    for b in batches:
        dec = ShardlineDecoder(model, max_batch=b, max_len=64 + 3 * steps + 2)
        rng = random.Random(0)
        dec.prefill([[rng.randrange(100, 10000) for _ in range(64)] for _ in range(b)])
        dec.decode(steps)   # warm-up
        out[b] = min(dec.decode(steps) for _ in range(2)) * 1e3
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 4], help="workers per replica (TP x PP)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256], help="sequences per decode step")
    ap.add_argument("--steps", type=int, default=200, help="steps timed per candidate and case")
    ap.add_argument("--no-step-time", action="store_true", help="skip timing the model's decode step")
    ap.add_argument("--model", help="model whose decode step the transport is compared with (default: bundled)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of that decode step")
    ap.add_argument("--quick", action="store_true", help="smoke-test size: 4 workers, batches 1 and 64, 40 steps")
    ap.add_argument("--output", help="append the markdown table to this file")
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.workers, args.batches, args.steps = [4], [1, 64], 40

    import ray
    from tqdm import tqdm

    from scheduler.wire import decode_step_output, encode_step_input

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'benchmarks'}"}})
    header = machine_line()
    rows, results = [], []
    try:
        Echo = make_worker_class()
        cases = [(w, b) for w in args.workers for b in args.batches]
        for n_workers, batch in tqdm(cases, desc="transport cases"):
            workers = [Echo.remote(samples=(i == n_workers - 1)) for i in range(n_workers)]
            ray.get([w.execute.remote(encode_step_input(decode_step(1))) for w in workers])   # started
            data = encode_step_input(decode_step(batch))
            dag = compiled_graph(workers)

            def actor_calls(data=data, workers=workers):
                t0 = time.perf_counter()
                payload = ray.put(data) if len(data) > INLINE_LIMIT else data
                refs = [w.execute.remote(payload) for w in workers]
                ready, _ = ray.wait(refs, num_returns=len(refs))
                out = ray.get(refs)
                decode_step_output(out[-1])
                return time.perf_counter() - t0

            def compiled(data=data, dag=dag):
                t0 = time.perf_counter()
                out = ray.get(dag.execute(data))
                decode_step_output(out[-1])
                return time.perf_counter() - t0

            for fn in (actor_calls, compiled):   # warm both paths
                for _ in range(5):
                    fn()
            times = interleaved({"actor calls": actor_calls, "compiled graph": compiled}, args.steps)
            dag.teardown()
            for w in workers:
                ray.kill(w)
            a, c = median(times["actor calls"]) * 1e3, median(times["compiled graph"]) * 1e3
            p90 = {k: statistics.quantiles(v, n=10)[-1] * 1e3 for k, v in times.items()}
            results.append({"workers": n_workers, "batch": batch, "message_bytes": len(data),
                            "actor_calls_ms": a, "compiled_graph_ms": c, "actor_calls_p90_ms": p90["actor calls"],
                            "compiled_graph_p90_ms": p90["compiled graph"]})
    finally:
        ray.shutdown()

    batches = sorted(set(args.batches))
    steps = {} if args.no_step_time else step_time_ms(common.model_path(args.model), batches, args.threads)
    for r in results:
        step = steps.get(r["batch"])
        r["model_step_ms"] = step
        rows.append([r["workers"], r["batch"], r["message_bytes"], round(r["actor_calls_ms"], 3),
                     round(r["compiled_graph_ms"], 3), f"{r['actor_calls_ms'] / r['compiled_graph_ms']:.2f}x",
                     "" if step is None else f"{step:.1f}",
                     "" if step is None else f"{100 * r['actor_calls_ms'] / step:.1f} %",
                     "" if step is None else f"{100 * r['compiled_graph_ms'] / step:.1f} %"])
    table = markdown_table(["workers", "batch", "step message bytes", "actor calls ms (median)",
                            "compiled graph ms (median)", "actor / compiled", "model decode step ms (1 rank)",
                            "actor calls share of step", "compiled share of step"], rows)
    text = f"### Transport: per-step actor calls vs Ray Compiled Graphs\n\n{header}\n\n{table}"
    print(text)
    write_result(args.output, text)
    out = {"machine": machine_info(args.threads), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
