"""Run every benchmark in sequence; collect their tables in results/latest.md and plot them.

Each benchmark runs in its own process (so one's threads, memory and Ray cluster never leak
into the next) with the shared flags passed through, and writes markdown (--output) and JSON
(--json) that this script gathers:

    benchmarks/results/latest.md          every table, with the machine and commit on top
    benchmarks/results/latest.json        the numbers
    benchmarks/results/throughput.png     decode step time, offline throughput, Ray layout ratios

    python benchmarks/run_all.py                           # everything (~15-25 minutes on 2 shared cores)
    python benchmarks/run_all.py --quick                   # smoke test of every script
    python benchmarks/run_all.py --only decode throughput  # a subset
    python benchmarks/run_all.py --decode-args="--batches 1 8 64" --throughput-args="--hf-batch-size 32"
    python benchmarks/run_all.py --plot-only                # redraw the PNG from results/latest.json

A benchmark that fails is reported in latest.md with the tail of its error; the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shlex
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the repo root, for `python benchmarks/...`

from benchmarks import common  # noqa: E402

BENCHMARKS = {"decode": "bench_decode.py", "throughput": "bench_throughput.py", "ray": "bench_ray.py"}


def run_one(name: str, passthrough: list[str], tmp: pathlib.Path) -> tuple[str, dict | None]:
    """(markdown, numbers or None) of one benchmark run in a child process."""
    md, js = tmp / f"{name}.md", tmp / f"{name}.json"
    cmd = [sys.executable, str(HERE / BENCHMARKS[name]), "--output", str(md), "--json", str(js), *passthrough]
    print(f"\n$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
    # stderr (progress bars) goes straight to the terminal; stdout is the benchmark's report
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0 or not md.is_file():
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        return (f"## {name}: FAILED (exit code {proc.returncode})\n\nCommand: `{shlex.join(cmd)}`\n\n"
                f"```\n{tail}\n```\n(see stderr of the run for the traceback)"), None
    return md.read_text(), json.loads(js.read_text()) if js.is_file() else None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def plot(data: dict[str, dict], path: pathlib.Path) -> bool:
    """One figure, one panel per benchmark that produced numbers; False if there is nothing to plot."""
    panels = [k for k in ("decode", "throughput", "ray") if data.get(k)]
    if not panels:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, name in zip(axes[0], panels):
        d = data[name]
        if name == "decode":
            rows = d["rows"]
            bars = [("shardline_ms", "Shardline"), ("hf_ms", "HF transformers"), ("floor_ms", "memory floor"),
                    ("compute_floor_ms", "compute floor")]
            bars = [(k, label) for k, label in bars if k in rows[0]]
            w = 0.8 / len(bars)
            x = range(len(rows))
            for j, (key, label) in enumerate(bars):
                ax.bar([i + (j - (len(bars) - 1) / 2) * w for i in x], [r[key] for r in rows], w, label=label)
            ax.set_xticks(list(x), [f"B={r['batch']}" for r in rows])
            ax.set_ylabel("ms per decode step")
            ax.set_title(f"Decode step, single rank ({d['bandwidth_gbs']:.0f} GB/s)")
            ax.legend()
        elif name == "throughput":
            tps = d["tokens_per_s"]
            ax.bar(["Shardline\nLLM.generate", f"HF generate\nbatches of {d['hf_batch_size']}"],
                   [tps["shardline"], tps["hf"]], color=["C0", "C1"])
            ax.set_ylabel("useful output tokens / s")
            ax.set_title(f"Offline throughput, {d['requests']} requests: {d['ratio']:.2f}x")
        else:
            labels, values = [], []
            for r in d["results"]:
                for batch, st in r["step_s"].items():
                    for lay, s in st.items():
                        if lay != "single":
                            labels.append(f"{r['model']}\n{lay} B={batch}")
                            values.append(st["single"] / s)
            ax.bar(range(len(values)), values, color="C2")
            ax.axhline(1.0, color="grey", lw=1, ls="--")
            ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=60, ha="right")
            ax.set_ylabel("single-rank step time / layout step time")
            ax.set_title("Ray layouts vs one rank (>1: faster)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    ap.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    ap.add_argument("--model", help="pass --model to every benchmark")
    ap.add_argument("--threads", type=int, help="pass --threads to every benchmark")
    for name in BENCHMARKS:
        ap.add_argument(f"--{name}-args", default="", help=f"extra flags for {BENCHMARKS[name]} (one string)")
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from results/latest.json, run nothing")
    args = ap.parse_args(argv)
    if args.plot_only:
        out_dir = pathlib.Path(args.results_dir)
        plot(json.loads((out_dir / "latest.json").read_text()), out_dir / "throughput.png")
        return

    shared = (["--quick"] if args.quick else []) + (["--model", args.model] if args.model else []) + \
        (["--threads", str(args.threads)] if args.threads else [])
    out_dir = pathlib.Path(args.results_dir)
    sections, data = [], {}
    from tqdm.auto import tqdm
    with tempfile.TemporaryDirectory() as tmp:
        for name in tqdm(args.only, desc="benchmarks", file=sys.stderr):
            extra = shlex.split(getattr(args, f"{name}_args"))
            md, numbers = run_one(name, shared + extra, pathlib.Path(tmp))
            sections.append(md.strip())
            data[name] = numbers
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "throughput.png"
    plotted = plot(data, png)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = [f"# Shardline benchmarks, {now}, commit {git_commit()}", "",
              f"Command: `{shlex.join([sys.executable, *sys.argv])}`  ", f"Machine: {common.machine_line()}.", "",
              "All timings come from one run with the compared systems interleaved; read the ratios, not the "
              "absolute numbers, on a shared machine.", ""]
    if plotted:
        header += [f"![results]({png.name})", ""]
    (out_dir / "latest.md").write_text("\n".join(header) + "\n\n".join(sections) + "\n")
    (out_dir / "latest.json").write_text(json.dumps(data, indent=1))
    print(f"\nwrote {out_dir / 'latest.md'}" + (f" and {png}" if plotted else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
