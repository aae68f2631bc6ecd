"""Batch inference with Ray Data: a JSONL file of prompts through a pool of Shardline engines.

    python examples/batch_ray_data.py --model DIR --input prompts.jsonl --output results/ \\
        [--tensor-parallel-size T] [--pipeline-parallel-size P] [--concurrency C] [--batch-size B] \\
        [--max-tokens N] [--temperature X] [--deployment NAME]

Input rows: {"id": ..., "prompt": "...", optional sampling fields: "max_tokens", "temperature",
"top_p", "top_k", "min_p", "seed", "stop", "min_tokens", "ignore_eos", ...} (any `SamplingParams`
field; the command-line values are the defaults). Output: JSONL files in OUTPUT, one row per input
row: {"id", "text", "prompt_tokens", "output_tokens", "finish_reason"}.

The pattern is `ray.data.llm`'s processor: `read_json` -> `map_batches` over a pool of C Ray Data
actors, each holding one Shardline `LLM` (a T x P engine whose workers are Ray actors of their
own) -> `write_json`. Ray Data streams the rows, balances batches over the pool, and shows its
progress bars.

Resumable: each run writes into a fresh OUTPUT/run-<time>/ folder, and first reads every row
already in OUTPUT; ids found there are skipped. A run killed half-way leaves its completed files
(and at most a torn last line, which is ignored), so rerunning with the same OUTPUT produces each
id exactly once.

With --deployment NAME the rows go to a running Shardline Serve deployment through
`cluster.connect(NAME)` instead of starting engines; --concurrency bounds the batches in flight.

Inside `ray job submit` (RAY_ADDRESS set) it joins that cluster; run directly, it starts a local one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import ray

from cluster import LLM, SamplingParams

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams) if f.init}
LIGHT_CPUS = 0   # Ray Data's own tasks and actors: the engines' workers reserve the cores (see main)
OUTPUT_COLUMNS = ("id", "text", "prompt_tokens", "output_tokens", "finish_reason")


# -- resuming ---------------------------------------------------------------------------------

def ids_already_written(output: Path) -> set[str]:
    """Ids of every complete row under `output` (JSON-encoded, so 7 and "7" stay different).

    A torn last line (the run was killed while writing) does not parse and is ignored: that row
    is simply done again.
    """
    done: set[str] = set()
    for path in sorted(output.rglob("*.json*")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "id" in row and "finish_reason" in row:
                    done.add(json.dumps(row["id"]))
    return done


class SkipDone:
    """Ray Data filter: drop rows whose id was already written (the set is shipped once per actor)."""

    def __init__(self, done: set[str]) -> None:
        self.done = done

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.array([json.dumps(_plain(i)) not in self.done for i in batch["id"]], dtype=bool)
        return {k: v[keep] for k, v in batch.items()}


# -- one batch through an engine ----------------------------------------------------------------

def rows_of(batch: dict[str, np.ndarray]) -> list[dict]:
    """Column batch -> list of row dicts, with missing (null / NaN) fields dropped."""
    names = list(batch)
    rows = []
    for values in zip(*(batch[n] for n in names)):
        rows.append({n: _plain(v) for n, v in zip(names, values) if not _missing(v)})
    return rows


def sampling_for(row: dict, defaults: dict) -> SamplingParams:
    """The row's own sampling fields over the command-line defaults; unknown fields are errors."""
    fields = {k: v for k, v in row.items() if k not in ("id", "prompt")}
    unknown = sorted(set(fields) - SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"row id={row.get('id')!r} has unknown field(s) {unknown}; allowed: id, prompt and "
                         f"SamplingParams fields {sorted(SAMPLING_FIELDS)}")
    for k in ("max_tokens", "top_k", "seed", "min_tokens", "n", "logprobs"):
        if isinstance(fields.get(k), float):   # JSON numbers of a column with nulls arrive as floats
            fields[k] = int(fields[k])
    return SamplingParams(**{**defaults, **fields})


def to_output_rows(rows: list[dict], outputs) -> dict[str, list]:
    cols: dict[str, list] = {c: [] for c in OUTPUT_COLUMNS}
    for row, out in zip(rows, outputs, strict=True):
        c = out.outputs[0]
        for name, value in zip(OUTPUT_COLUMNS, (row["id"], c.text, len(out.prompt_token_ids), len(c.token_ids),
                                                c.finish_reason)):
            cols[name].append(value)
    return cols


class EngineUDF:
    """A Ray Data actor holding one Shardline engine (T x P worker actors of its own)."""

    def __init__(self, model: str, tp: int, pp: int, defaults: dict, engine_kwargs: dict) -> None:
        self.defaults = defaults
        self.llm = LLM(model, tensor_parallel_size=tp, pipeline_parallel_size=pp, **engine_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = rows_of(batch)
        params = [sampling_for(r, self.defaults) for r in rows]
        outputs = self.llm.generate([r["prompt"] for r in rows], params, use_tqdm=False)
        return to_output_rows(rows, outputs)


class DeploymentUDF:
    """A Ray Data actor sending its batches to a running Serve deployment (no engine of its own)."""

    def __init__(self, name: str, defaults: dict) -> None:
        from cluster import connect  # the serving client handle; only this path needs it

        self.defaults = defaults
        self.handle = connect(name, address=None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        rows = rows_of(batch)
        params = [sampling_for(r, self.defaults) for r in rows]
        outputs = self.handle.generate([r["prompt"] for r in rows], params)
        return to_output_rows(rows, outputs)


# -- the job --------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.seed is not None:
        defaults["seed"] = args.seed

    _init_ray()
    done = ids_already_written(output)
    print(f"{len(done)} ids already in {output}; they are skipped", flush=True)
    # Reading, filtering, writing and the engine actors themselves are light: they reserve no CPU,
    # so the engines' workers (which reserve theirs through placement groups) get the cores, and
    # finished rows are written as they come instead of waiting for CPUs the workers hold.
    light = {"num_cpus": LIGHT_CPUS}
    ds = ray.data.read_json(str(Path(args.input).resolve()), lines=True, num_cpus=LIGHT_CPUS)
    ds = ds.map_batches(SkipDone, fn_constructor_args=(done,), batch_format="numpy",
                        compute=ray.data.ActorPoolStrategy(size=1), **light)
    if args.deployment:
        udf, ctor_args = DeploymentUDF, (args.deployment, defaults)
    else:
        engine_kwargs = {"max_num_seqs": args.batch_size, "dtype": args.dtype}
        if args.cpus_per_worker is not None:
            engine_kwargs["cpus_per_worker"] = args.cpus_per_worker
        udf, ctor_args = EngineUDF, (args.model, args.tensor_parallel_size, args.pipeline_parallel_size,
                                     defaults, engine_kwargs)
    # the actor only schedules; its engine's workers reserve their own CPUs
    results = ds.map_batches(udf, fn_constructor_args=ctor_args, batch_size=args.batch_size, batch_format="numpy",
                             compute=ray.data.ActorPoolStrategy(size=args.concurrency), **light)
    run_dir = output / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    start = time.perf_counter()
    results.write_json(str(run_dir), ray_remote_args=light)
    seconds = time.perf_counter() - start
    written = len(ids_already_written(run_dir)) if run_dir.exists() else 0
    print(f"wrote {written} rows to {run_dir} in {seconds:.1f} s; {len(ids_already_written(output))} ids done "
          f"in {output}", flush=True)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder, readable at this path on every node")
    ap.add_argument("--input", required=True, help="JSONL file of {\"id\", \"prompt\", ...} rows")
    ap.add_argument("--output", required=True, help="output folder (reruns skip the ids already in it)")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--pipeline-parallel-size", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=1, help="engines (or in-flight batches with --deployment)")
    ap.add_argument("--batch-size", type=int, default=16, help="rows per map_batches call")
    ap.add_argument("--max-tokens", type=int, default=64, help="default for rows without max_tokens")
    ap.add_argument("--temperature", type=float, default=0.0, help="default for rows without temperature")
    ap.add_argument("--seed", type=int, default=None, help="default for rows without seed")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs each engine worker reserves")
    ap.add_argument("--deployment", default=None, metavar="NAME",
                    help="send rows to this running Serve deployment instead of starting engines")
    args = ap.parse_args(argv)
    if not args.deployment and not args.model:
        ap.error("--model is required (unless --deployment NAME sends the rows to a running deployment)")
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "concurrency", "batch_size", "max_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    return args


def _init_ray() -> None:
    """Join the job's cluster; run directly, start a local Ray whose workers can import this checkout."""
    if ray.is_initialized():      # called from a driver that is already connected
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT)}})


def _plain(v):
    """numpy scalars -> Python values (for JSON and SamplingParams)."""
    return v.item() if isinstance(v, np.generic) else (v.tolist() if isinstance(v, np.ndarray) else v)


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


if __name__ == "__main__":
    raise SystemExit(main())
