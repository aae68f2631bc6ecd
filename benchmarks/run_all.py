"""The benchmark suite: run its parts in sequence, write JSON + markdown + a PNG into benchmarks/results/.

`shardline bench [PART ...]` and `make bench` run this script. The parts (issue 10, "The suite"):

    roofline    bench_decode.py      batch-1 decode vs the memory floor, batched decode vs the GEMM rate,
                                     both measured in the same run; HF's step alongside
    throughput  bench_throughput.py  offline LLM.generate vs HF generate with static batching, seeded workload
    serve       bench_serve.py       `shardline serve` over HTTP: Poisson arrivals at several rates (TTFT, TPOT,
                                     ITL mean/p50/p99, req/s, output tok/s, failures), saturation vs offline
    scaling     bench_ray.py         layouts PP=2, TP=2/3, DP=2 vs one rank, SmolLM2 and the tiny even-head Llama
    memory      bench_memory.py      per rank: weight bytes, KV-cache bytes, RSS and peak RSS (asked of each worker)
    transport   bench_transport.py   executor -> worker step messages: per-step actor calls vs Ray Compiled Graphs

Each part runs in its own process (one's threads, memory and Ray never leak into the next) with
the shared flags passed through. A run writes, for all parts (the default):

    benchmarks/results/latest.md     a summary table, then every part's tables; machine and commit on top
    benchmarks/results/latest.json  {"machine": ..., "command": ..., "parts": {part: numbers}}
    benchmarks/results/latest.png   one panel per part

and for a subset, the same three files named after the parts (e.g. results/roofline.md), so a
partial run never overwrites the full one. A part that fails is reported in the markdown (with
the tail of its output) and in the JSON as null; the others still run; the exit status is 1.

    python benchmarks/run_all.py                      # everything: ~25 min on 2 shared cores
    python benchmarks/run_all.py --quick              # every part in smoke-test size: ~6 min
    python benchmarks/run_all.py roofline throughput  # a subset
    python benchmarks/run_all.py --tiny --quick       # the tiny random Llama everywhere: a check that it all runs
    python benchmarks/run_all.py --roofline-args="--batches 1 8 64 --profile" --serve-args="--rates 1 4 inf"
    python benchmarks/run_all.py --plot-only          # redraw results/latest.png from results/latest.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repo root, for `python benchmarks/...`

from benchmarks import common, plots  # noqa: E402

PARTS = {"roofline": "bench_decode.py", "throughput": "bench_throughput.py", "serve": "bench_serve.py",
         "scaling": "bench_ray.py", "memory": "bench_memory.py",
         "transport": "bench_transport.py"}
ALIASES = {"decode": "roofline", "ray": "scaling", "all": None}   # earlier names of the parts; all = every part

# Flags the suite gives each part unless --quick (the parts' own defaults fit a standalone run; these keep
# the whole suite near 25 minutes on 2 shared cores). --<part>-args come after and override them.
SUITE_DEFAULTS = {
    "roofline": ["--reps", "12", "--compile"],   # --compile: eager vs compile=True decode steps, same run
    "throughput": ["--num-requests", "96"],
    "serve": ["--num-requests", "64", "--rounds", "1", "--stream-levels", "1", "--latency-requests", "8"],
    "scaling": ["--layouts", "PP=2", "PP=2-drain", "TP=2", "DP=2", "--batches", "1", "32", "64"],
    "memory": [],
    "transport": ["--steps", "100"],
}
# With --quick: each part's own --quick, trimmed further so the whole suite stays near 6 minutes.
SUITE_QUICK = {
    "roofline": ["--quick"],
    "throughput": ["--quick"],
    "serve": ["--quick", "--stream-levels", "--rates", "1", "2", "inf"],
    "scaling": ["--quick"],
    "memory": ["--quick", "--layouts", "PP=2", "TP=2"],
    "transport": ["--quick"],
}
# Parts whose scripts pick their models with --models (smollm2 / tiny) rather than one --model.
MULTI_MODEL = {"scaling", "memory"}


def run_one(name: str, args: list[str], tmp: pathlib.Path) -> tuple[str, dict | None]:
    """(markdown, numbers or None) of one part run in a child process."""
    md, js = tmp / f"{name}.md", tmp / f"{name}.json"
    cmd = [sys.executable, str(HERE / PARTS[name]), *args, "--output", str(md), "--json", str(js)]
    print(f"\n$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    # stderr (progress bars) goes straight to the terminal; stdout is the part's report
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0 or not md.is_file() or not js.is_file():
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        return (f"## {name}: FAILED (exit code {proc.returncode})\n\nCommand: `{shlex.join(cmd)}`\n\n"
                f"```\n{tail}\n```\n(see stderr of the run for the traceback)"), None
    return md.read_text(), json.loads(js.read_text())


def part_args(name: str, args: argparse.Namespace, tiny_model: str | None) -> list[str]:
    """The flags one part gets: SUITE_DEFAULTS or SUITE_QUICK, the model, --threads, then --<part>-args."""
    out = list(SUITE_QUICK[name] if args.quick else SUITE_DEFAULTS[name])
    if tiny_model and name in MULTI_MODEL:
        out += ["--models", "tiny"]
    elif tiny_model or args.model:
        out += ["--model", tiny_model or args.model]
    if args.threads and name != "serve":   # the server's ranks take their threads from --cpus-per-worker
        out += ["--threads", str(args.threads)]
    return out + shlex.split(getattr(args, f"{name}_args"))


# ------------------------------------------------------------------------------------- summary


def summary_rows(parts: dict[str, dict | None]) -> list[tuple[str, str, str]]:
    """(part, figure, value) headline rows: the ratios the issue's targets are stated in."""
    rows: list[tuple[str, str, str]] = []
    if d := parts.get("roofline"):
        for r in d["rows"]:
            rows.append(("roofline", f"B={r['batch']} decode step: Shardline / memory floor",
                         f"{r['shardline_over_floor']:.2f} ({r['shardline_ms']:.1f} / {r['floor_ms']:.1f} ms)"))
            rows.append(("roofline", f"B={r['batch']} decode step: Shardline / compute floor",
                         f"{r['shardline_over_compute_floor']:.2f} ({r['compute_floor_ms']:.1f} ms)"))
            rows.append(("roofline", f"B={r['batch']} decode step: HF / Shardline (>1: faster than HF)",
                         f"{r['hf_over_shardline']:.2f} (HF {r['hf_ms']:.1f} ms)"))
            if "compiled_ms" in r:
                rows.append(("roofline", f"B={r['batch']} decode step: eager / compile=True, wall (CPU time); "
                             "first step s", f"{r['eager_over_compiled']:.2f} ({r['eager_over_compiled_cpu']:.2f}); "
                             f"{r['compile_s']:.1f}"))
    if d := parts.get("throughput"):
        rows.append(("throughput", f"offline tokens/s vs HF static batches of {d['hf_batch_size']}, "
                     f"{d['requests']} requests", f"{d['ratio']:.2f}x ({d['tokens_per_s']['shardline']:.1f} vs "
                     f"{d['tokens_per_s']['hf']:.1f} tok/s)"))
    if d := parts.get("serve"):
        rows.append(("serve", f"HTTP at saturation ({d['concurrency']} streams) / offline, same Ray executor",
                     f"{d['http_over_offline']:.2f}"))
        for p in d.get("poisson", []):
            rows.append(("serve", f"{p['rate']} req/s: TTFT p50 / p99, TPOT p50, ITL p99 (ms); output tok/s; failed",
                         f"{_ms(p['ttft']['p50'])} / {_ms(p['ttft']['p99'])}, {_ms(p['tpot']['p50'])}, "
                         f"{_ms(p['itl']['p99'])}; {p['output_throughput']:.1f}; {p['failed']}"))
    if d := parts.get("scaling"):
        for r in d["results"]:
            batch = max(r["step_s"], key=int)
            st = r["step_s"][batch]
            for lay, s in st.items():
                if lay != "single":
                    rows.append(("scaling", f"{r['model']} B={batch}: single-rank step / {lay} step (>1: faster)",
                                 f"{st['single'] / s:.2f}"))
    if d := parts.get("memory"):
        for r in d["results"]:
            for lay in r["layouts"]:
                mb = lambda key, ranks=lay["ranks"]: max(k[key] for k in ranks) / 1e6
                rows.append(("memory", f"{r['model']} {lay['layout']}, largest rank: weights / KV cache / peak RSS "
                             "(MB)", f"{mb('weight_bytes'):.1f} / {mb('kv_cache_bytes'):.1f} / {mb('peak_rss'):.0f}"))
    if d := parts.get("transport"):
        widest = max(x["workers"] for x in d["results"])
        for r in d["results"]:
            if r["workers"] == widest:
                share = "" if r.get("model_step_ms") is None else (
                    f"; {100 * r['actor_calls_ms'] / r['model_step_ms']:.1f} % of a 1-rank decode step")
                rows.append(("transport", f"{r['workers']} workers B={r['batch']}: actor calls / compiled graph "
                             "per step", f"{r['actor_calls_ms'] / r['compiled_graph_ms']:.2f}x "
                             f"({r['actor_calls_ms']:.2f} vs {r['compiled_graph_ms']:.2f} ms{share})"))
    return rows


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{1e3 * v:.0f}" if v >= 0.01 else f"{1e3 * v:.1f}"


def machine_text(m: dict) -> str:
    load = ", ".join(f"{x:.1f}" for x in m["load_average"]) if m.get("load_average") else "n/a"
    simd = ", ".join(m.get("cpu_simd") or []) or "n/a"
    return (f"CPU: {m['cpu_model']} ({m['cores']} cores; {simd}); torch {m['torch']}, {m['threads']} threads per "
            f"process (OMP_WAIT_POLICY={m['omp_wait_policy']}); load average {load} (1, 5, 15 min) at start; "
            f"commit {m['commit']}; {m['utc']}")


def finite(obj):
    """`obj` with every NaN / infinite float replaced by None, so the JSON is strict (no NaN, Infinity)."""
    import math
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def write_results(out: pathlib.Path, stem: str, record: dict, sections: list[str]) -> list[pathlib.Path]:
    """Write <stem>.json, <stem>.png (if any part has numbers) and <stem>.md; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    js, png, md = out / f"{stem}.json", out / f"{stem}.png", out / f"{stem}.md"
    js.write_text(json.dumps(finite(record), indent=1, allow_nan=False) + "\n")
    plotted = plots.plot(record["parts"], png)
    failed = [n for n, v in record["parts"].items() if v is None]
    header = [f"# Shardline benchmarks ({', '.join(record['parts'])})", "",
              f"Command: `{record['command']}`{' (--quick: smoke-test sizes)' if record['quick'] else ''}  ",
              machine_text(record["machine"]) + ".", "",
              "Every comparison is measured in one run with its sides interleaved; on a shared machine read the "
              "ratios, not the milliseconds.", ""]
    if failed:
        header += [f"**Failed parts: {', '.join(failed)}** (see their sections).", ""]
    header += ["## Summary", "", common.markdown_table(["part", "figure", "value"], summary_rows(record["parts"])), ""]
    if plotted:
        header += [f"![benchmarks]({png.name})", ""]
    md.write_text("\n".join(header) + "\n" + "\n\n".join(s.strip() for s in sections) + "\n")
    return [md, js] + ([png] if plotted else [])


# ------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="shardline bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    # no choices= here: argparse checks an empty list against them and rejects it
    ap.add_argument("parts", nargs="*", metavar="PART",
                    help=f"parts to run: {', '.join(PARTS)} or all (default: all)")
    ap.add_argument("--only", nargs="+", choices=[*PARTS, *ALIASES], help=argparse.SUPPRESS)  # earlier spelling
    ap.add_argument("--quick", action="store_true", help="pass --quick to every part (smoke-test sizes)")
    ap.add_argument("--tiny", action="store_true",
                    help="run every part on a tiny random Llama built on the spot (checks the suite, not the speed)")
    ap.add_argument("--model", metavar="DIR", help="model folder for every part (default: the bundled SmolLM2)")
    ap.add_argument("--threads", type=int, help="pass --threads to every part but serve (default: theirs, 2)")
    for name in PARTS:
        ap.add_argument(f"--{name}-args", default="", metavar="FLAGS",
                        help=f"extra flags for {PARTS[name]}, one string (see its --help)")
    for old, new in (("decode", "roofline"), ("ray", "scaling")):
        ap.add_argument(f"--{old}-args", dest=f"{new}_args", help=argparse.SUPPRESS)
    ap.add_argument("--results-dir", default=str(HERE / "results"), metavar="DIR")
    ap.add_argument("--plot-only", action="store_true", help="redraw results/latest.png from latest.json, run nothing")
    args = ap.parse_args(argv)
    for p in args.parts:
        if p not in PARTS and p not in ALIASES:
            ap.error(f"PART {p!r} is not a part of the suite: choose from {', '.join(PARTS)} or all")
    if args.tiny and args.model:
        ap.error("--tiny and --model both choose the model: give one")
    chosen = [ALIASES.get(p, p) for p in (args.parts or []) + (args.only or [])]
    args.parts = list(PARTS) if not chosen or None in chosen else list(dict.fromkeys(chosen))
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads={args.threads}: give at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = pathlib.Path(args.results_dir)
    stem = "latest" if args.parts == list(PARTS) else "_".join(args.parts)
    if args.plot_only:
        record = json.loads((out / f"{stem}.json").read_text())
        plots.plot(record["parts"], out / f"{stem}.png")
        return 0
    machine = common.machine_info(args.threads or 2)   # every part's --threads default is 2
    # `shardline bench ARGS` runs this script with exactly ARGS: record the command a user would type
    command = shlex.join(["shardline", "bench", *(sys.argv[1:] if argv is None else argv)])
    sections, parts = [], {}
    from tqdm.auto import tqdm
    with tempfile.TemporaryDirectory() as tmp:
        tiny = None
        if args.tiny:
            from tests.fixtures.tiny_models import build_tiny_llama
            tiny = str(build_tiny_llama(pathlib.Path(tmp) / "tiny_llama"))
        for name in tqdm(args.parts, desc="benchmark suite", file=sys.stderr):
            md, numbers = run_one(name, part_args(name, args, tiny), pathlib.Path(tmp))
            sections.append(md)
            parts[name] = numbers
    record = {"machine": machine, "command": command, "quick": args.quick, "tiny": args.tiny, "parts": parts}
    written = write_results(out, stem, record, sections)
    print("\nwrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 1 if any(v is None for v in parts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
