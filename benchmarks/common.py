"""Shared pieces of the benchmarks: the model folder, timing, memory bandwidth, markdown tables.

Every benchmark compares candidates measured in the same run on the same machine, with their
repetitions interleaved (A B, B A, A B, ...) so that load from other processes hits both
alike; what we report are medians and ratios of medians, never absolute timings alone.
"""

from __future__ import annotations

import functools
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence

# On a shared, oversubscribed machine libgomp's default spin-then-yield barrier makes every
# multi-threaded op wait for a descheduled sibling thread: measured here, a 2-thread `sin` of
# 2k floats took 5-15 ms instead of 0.01 ms. Passive waiting removes that pathology for both
# sides alike. It must be set before torch (and its OpenMP runtime) is loaded; an explicit
# OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the repo
    sys.path.insert(0, str(REPO_ROOT))

FALLBACK_MODEL = "/tmp/smol"
"""A converted SmolLM2 copy used only when `cluster.model_prep` cannot be imported."""


def model_path(explicit: str | None = None) -> str:
    """The benchmark model: --model if given, else the bundled SmolLM2 (converted once)."""
    if explicit:
        return explicit
    try:
        from cluster.model_prep import prepare_model
    except ImportError:
        return FALLBACK_MODEL
    return str(prepare_model())


def bench_models(names: Sequence[str], real_model: str | None, bench: Callable[[str, str], dict]) -> list[dict]:
    """`bench(name, folder)` for each model name, in order: "tiny" is the tiny random Llama of the tests
    (built in a temporary folder, removed afterwards), any other name the real model (`model_path(real_model)`)."""
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if name == "tiny":
                from tests.fixtures.tiny_models import build_tiny_llama
                path = str(build_tiny_llama(pathlib.Path(tmp) / "tiny_llama"))
            else:
                path = model_path(real_model)
            results.append(bench(name, path))
    return results


def set_threads(n: int) -> None:
    import torch
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)  # for child processes


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(candidates: dict[str, Callable[[], float]], reps: int) -> dict[str, list[float]]:
    """Run each candidate `reps` times, rotating the order every round; name -> list of results.

    Each callable returns its own measurement (seconds, GB/s, ...), so it may exclude its own
    set-up from the timing.
    """
    names = list(candidates)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        if r % 2:
            order.reverse()
        for n in order:
            out[n].append(candidates[n]())
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """'min-max' relative to the median, for a quick read of the noise: '±4%'."""
    m = median(xs)
    return f"±{100 * max(m - min(xs), max(xs) - m) / m:.0f}%" if m else "n/a"


def memory_bandwidth_gbs(gigabytes: float = 1.0) -> Callable[[], float]:
    """A callable measuring read bandwidth (GB/s) by summing a `gigabytes` float32 tensor.

    Decoding is read-bound (every weight is read once per step, little is written), so the
    read bandwidth is the relevant limit. The tensor is allocated once and reused.
    """
    import torch
    n = int(gigabytes * 1e9) // 4
    buf = torch.ones(n, dtype=torch.float32)
    buf.sum()  # fault the pages in

    def run() -> float:
        return buf.numel() * 4 / 1e9 / timed(lambda: buf.sum())
    return run


def copy_bandwidth_gbs(gigabytes: float = 1.0) -> Callable[[], float]:
    """Like `memory_bandwidth_gbs` but `dst.copy_(src)`: counts bytes read + bytes written."""
    import torch
    n = int(gigabytes * 1e9) // 4 // 2
    src, dst = torch.ones(n), torch.zeros(n)
    dst.copy_(src)

    def run() -> float:
        return 2 * n * 4 / 1e9 / timed(lambda: dst.copy_(src))
    return run


def matmul_gflops(n: int = 1024) -> Callable[[], float]:
    """A callable measuring fp32 matmul throughput (GFLOP/s) on an n x n x n product."""
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b

    def run() -> float:
        return 2 * n ** 3 / 1e9 / timed(lambda: a @ b)
    return run


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def machine_line() -> str:
    """One line describing where the numbers come from (computed once: the load is the first call's)."""
    import platform

    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}, load average {load:.1f} at start")


def write_result(path: str | None, text: str) -> None:
    """Append `text` to `path` (used by run_all.py to collect every benchmark's tables)."""
    if path:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text.rstrip() + "\n\n")


def cpu_model() -> str:
    """`lscpu`'s "Model name" (falls back to /proc/cpuinfo, then the platform string)."""
    import platform
    import subprocess
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.strip().startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_simd() -> list[str]:
    """The vector extensions that decide fp32 / bf16 / int8 matmul speed, among the CPU's flags (Linux)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return []
    return [w for w in wanted if w in flags]


def git_commit() -> str:
    """Short commit of the checkout the benchmarks run from, with '+dirty' if it has uncommitted changes."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if head and dirty else "")


def machine_info(threads: int) -> dict:
    """Where and from what the numbers come: CPU model, cores, torch, threads, load average, commit, time."""
    import datetime
    from importlib.metadata import version  # not `import torch`: the suite's driver stays light

    return {"cpu_model": cpu_model(), "cpu_simd": cpu_simd(), "cores": os.cpu_count(), "torch": version("torch"),
            "threads": threads,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "commit": git_commit(),
            "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def percentiles(xs: Sequence[float], qs: Sequence[int] = (50, 99)) -> dict[str, float]:
    """{'mean': ..., 'p50': ..., 'p99': ...} of `xs` (linear interpolation, numpy's default); None if empty
    (None, not NaN: the results stay strict JSON)."""
    import numpy as np
    if not len(xs):
        return {"mean": None, **{f"p{q}": None for q in qs}}
    arr = np.asarray(xs, dtype=float)
    return {"mean": float(arr.mean()), **{f"p{q}": float(np.percentile(arr, q)) for q in qs}}
