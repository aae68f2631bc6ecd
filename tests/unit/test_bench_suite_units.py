"""The benchmark suite's own arithmetic and bookkeeping: Poisson arrivals, the serving figures, the
figure with every part's panel, and a failing part that is reported instead of lost."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from benchmarks import plots, run_all
from benchmarks.bench_serve import arrival_times, serving_metrics


def test_poisson_arrivals_are_seeded_increasing_and_have_the_asked_rate():
    times = arrival_times(4000, rate=2.0, seed=3)
    assert times == arrival_times(4000, rate=2.0, seed=3)
    assert times != arrival_times(4000, rate=2.0, seed=4)
    gaps = [b - a for a, b in zip([0.0, *times], times)]
    assert all(g > 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.08)      # exponential, mean 1 / rate
    assert statistics.pstdev(gaps) == pytest.approx(0.5, rel=0.1)     # ... and sd 1 / rate
    assert arrival_times(5, rate=math.inf) == [0.0] * 5                # saturation: all at once


def test_serving_metrics_are_vllm_bench_serve_definitions():
    ok = [{"ok": True, "start": 10.0, "chunks": [10.5, 10.7, 11.1], "tokens": 3},   # TTFT .5, TPOT .3, ITL .2 .4
          {"ok": True, "start": 20.0, "chunks": [21.0, 21.1], "tokens": 2}]         # TTFT 1, TPOT .1, ITL .1
    failed = {"ok": False, "error": "HTTP 503: b'busy'"}
    m = serving_metrics([*ok, failed], elapsed=4.0)
    assert (m["completed"], m["failed"], m["errors"]) == (2, 1, ["HTTP 503: b'busy'"])
    assert m["request_throughput"] == pytest.approx(0.5)
    assert m["output_throughput"] == pytest.approx(5 / 4.0)
    assert m["ttft"]["mean"] == pytest.approx(0.75) and m["ttft"]["p50"] == pytest.approx(0.75)
    assert m["tpot"]["mean"] == pytest.approx(0.2)
    assert m["itl"]["mean"] == pytest.approx((0.2 + 0.4 + 0.1) / 3)
    assert m["itl"]["p99"] == pytest.approx(0.4, abs=0.01)
    none = serving_metrics([failed], elapsed=1.0)
    assert none["completed"] == 0 and none["ttft"]["p50"] is None     # no NaN: the JSON stays strict
    json.dumps(none, allow_nan=False)


def _parts() -> dict:
    """Every part's JSON in the shape its script writes (small numbers, not a measurement)."""
    rank = {"replica": 0, "pp_rank": 0, "tp_rank": 0, "pid": 1, "weight_bytes": 5e8, "kv_cache_bytes": 1e8,
            "rss": 9e8, "peak_rss": 1e9, "rss_anon": 7e8}
    stats = {"mean": 0.1, "p50": 0.09, "p99": 0.3}
    return {
        "roofline": {"bandwidth_gbs": 30.0, "matmul_gflops": 60.0, "rows": [
            {"batch": 1, "shardline_ms": 50.0, "hf_ms": 55.0, "hf_over_shardline": 1.1, "floor_ms": 17.0,
             "shardline_over_floor": 2.94, "compute_floor_ms": 5.0, "shardline_over_compute_floor": 10.0}]},
        "throughput": {"tokens_per_s": {"shardline": 100.0, "hf": 40.0}, "ratio": 2.5, "requests": 8,
                       "hf_batch_size": 4},
        "serve": {"concurrency": 8, "http_over_offline": 0.93, "poisson": [
            {"rate": 1.0, "completed": 4, "failed": 0, "request_throughput": 0.9, "output_throughput": 30.0,
             "ttft": stats, "tpot": stats, "itl": stats},
            {"rate": "inf", "completed": 4, "failed": 1, "request_throughput": 1.5, "output_throughput": 50.0,
             "ttft": stats, "tpot": {"mean": None, "p50": None, "p99": None}, "itl": stats}]},
        "scaling": {"results": [{"model": "tiny", "step_s": {"1": {"single": 0.01, "PP=2": 0.02},
                                                              "32": {"single": 0.05, "PP=2": 0.04}}}]},
        "memory": {"results": [{"model": "tiny", "layouts": [{"layout": "PP=2", "ranks": [rank, {**rank,
                                                                                             "pp_rank": 1}]}]}]},
        "transport": {"results": [
            {"workers": 1, "batch": 1, "actor_calls_ms": 1.0, "compiled_graph_ms": 0.4, "model_step_ms": 60.0},
            {"workers": 4, "batch": 1, "actor_calls_ms": 3.0, "compiled_graph_ms": 1.0, "model_step_ms": 60.0},
            {"workers": 4, "batch": 64, "actor_calls_ms": 3.0, "compiled_graph_ms": 1.5, "model_step_ms": None}]},
    }


def test_summary_and_figure_cover_every_part(tmp_path):
    import matplotlib.image

    parts = _parts()
    rows = run_all.summary_rows(parts)
    assert {r[0] for r in rows} == set(run_all.PARTS)
    assert ("throughput", "offline tokens/s vs HF static batches of 4, 8 requests",
            "2.50x (100.0 vs 40.0 tok/s)") in rows
    assert ("scaling", "tiny B=32: single-rank step / PP=2 step (>1: faster)", "1.25") in rows
    assert ("transport", "4 workers B=1: actor calls / compiled graph per step",
            "3.00x (3.00 vs 1.00 ms; 5.0 % of a 1-rank decode step)") in rows
    assert len([r for r in rows if r[0] == "transport"]) == 2   # the largest replica's rows only
    assert plots.plot(parts, tmp_path / "all.png")
    assert matplotlib.image.imread(tmp_path / "all.png").shape[:2] == (960, 1800)   # 2 rows x 3 panels (6 parts)
    assert not plots.plot({"roofline": None}, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_a_failing_part_is_reported_and_fails_the_run(tmp_path, monkeypatch):
    broken = tmp_path / "broken.py"
    broken.write_text("import sys\nprint('step 1 ok')\nprint('cannot reach the model')\nsys.exit(3)\n")
    monkeypatch.setitem(run_all.PARTS, "roofline", str(broken))   # HERE / an absolute path = that path
    out = tmp_path / "results"
    assert run_all.main(["roofline", "--results-dir", str(out)]) == 1
    record = json.loads((out / "roofline.json").read_text())
    assert record["parts"] == {"roofline": None}
    md = (out / "roofline.md").read_text()
    assert "**Failed parts: roofline**" in md and "## roofline: FAILED (exit code 3)" in md
    assert "cannot reach the model" in md
    assert not (out / "roofline.png").exists() and not (out / "latest.md").exists()
