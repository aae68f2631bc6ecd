"""`shardline bench` runs the suite end to end and writes strict JSON, a markdown report and a PNG.

One part (roofline: Shardline, HF and both probes) on the tiny random Llama in smoke-test size; each
part costs a process start, and the Ray and HTTP parts a cluster or a server start, so the other
parts' summaries and panels are checked from their JSON in tests/unit/test_bench_suite_units.py.
"""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest
import torch

from cluster.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def _strict_json(text: str) -> dict:
    def reject(name):
        raise ValueError(f"{name} in the results: not strict JSON")
    return json.loads(text, parse_constant=reject)


def _lscpu_model_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:"))


def test_shardline_bench_writes_json_markdown_and_png_with_the_machine(tiny_llama_dir, tmp_path):
    import matplotlib.image

    out = tmp_path / "results"
    rc = main(["bench", "roofline", "--quick", "--model", str(tiny_llama_dir), "--results-dir", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["roofline.json", "roofline.md", "roofline.png"]   # not latest.*
    record = _strict_json((out / "roofline.json").read_text())
    machine = record["machine"]
    assert machine["cpu_model"] == _lscpu_model_name()
    assert machine["torch"] == torch.__version__
    cpuinfo = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    flags = next(line for line in cpuinfo if line.startswith("flags")).split(":", 1)[1].split()
    assert set(machine["cpu_simd"]) <= set(flags) and ("avx2" in flags) == ("avx2" in machine["cpu_simd"])
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert machine["commit"].startswith(head) and len(machine["load_average"]) == 3 and machine["threads"] >= 1
    assert record["quick"] is True and "--results-dir" in record["command"]

    assert list(record["parts"]) == ["roofline"]
    roofline = record["parts"]["roofline"]
    assert [r["batch"] for r in roofline["rows"]] == [1, 4]   # bench_decode.py --quick
    for r in roofline["rows"]:
        assert r["shardline_ms"] > 0 and r["hf_ms"] > 0 and r["floor_ms"] > 0 and r["compute_floor_ms"] > 0
        assert r["shardline_over_floor"] == pytest.approx(r["shardline_ms"] / r["floor_ms"])
        assert r["hf_over_shardline"] == pytest.approx(r["hf_ms"] / r["shardline_ms"])
    assert roofline["bandwidth_gbs"] > 0 and roofline["matmul_gflops"] > 0

    md = (out / "roofline.md").read_text()
    assert machine["cpu_model"] in md and f"torch {torch.__version__}" in md and machine["commit"] in md
    assert "## Summary" in md and "![benchmarks](roofline.png)" in md
    for r in roofline["rows"]:
        assert f"| roofline | B={r['batch']} decode step: Shardline / memory floor | {r['shardline_over_floor']:.2f} " \
            in md
    assert "## Decode step time, single rank (bench_decode.py)" in md and "FAILED" not in md
    assert matplotlib.image.imread(out / "roofline.png").shape[:2] == (480, 600)   # one panel per part
