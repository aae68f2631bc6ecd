"""No processes beyond bash: the launch scripts' usage and input errors, the batch job's helpers,
the pre-flight's per-node checks and the token error message."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster.preflight import NodeRow, PreflightResult
from cluster.preflight_probe import SIMULATE_ENV, check_model_here, model_files
from cluster.ray_connect import missing_token_message

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "cluster" / "launch"
SCRIPTS = ["start_head.sh", "start_worker.sh", "submit.sh", "stop.sh"]


def _run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin:/bin", "HOME": "/nonexistent-home"}
    return subprocess.run([str(LAUNCH / script), *args], capture_output=True, text=True, timeout=30,
                          env={**base, **(env or {})})


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_launch_script_has_help_and_rejects_unknown_options(script, tmp_path):
    done = _run(script, "--help")
    assert done.returncode == 0 and done.stdout.startswith("Usage:"), done
    done = _run(script, "--no-such-option", env={"SHARDLINE_STATE_DIR": str(tmp_path)})
    assert done.returncode == 2 and "unknown option '--no-such-option'" in done.stderr, done


def test_launch_scripts_are_strict_bash():
    for script in SCRIPTS:
        text = (LAUNCH / script).read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
        assert not re.search(r"(^|[;&|(])\s*ray stop\b", text, re.M), f"{script} runs `ray stop`"


def test_worker_and_submit_input_errors_say_what_to_change(tmp_path):
    done = _run("start_worker.sh")
    assert done.returncode == 2 and "ADDRESS is required" in done.stderr
    done = _run("start_worker.sh", "not-an-address")
    assert done.returncode == 2 and "must be host:port" in done.stderr
    done = _run("submit.sh", "--address", "127.0.0.1:1")
    assert done.returncode == 2 and "no command: give it after --" in done.stderr
    done = _run("stop.sh", env={"SHARDLINE_STATE_DIR": str(tmp_path)})
    assert done.returncode == 0 and "nothing to stop" in done.stdout


def test_submit_without_a_token_says_how_to_get_it(tmp_path):
    done = _run("submit.sh", "--address", "http://127.0.0.1:1", "--", "true",
                env={"HOME": str(tmp_path), "SHARDLINE_STATE_DIR": str(tmp_path)})
    assert done.returncode == 3
    assert "ray get-auth-token" in done.stderr and "RAY_AUTH_TOKEN_PATH" in done.stderr
    assert f"{tmp_path}/.ray/auth_token does not exist" in done.stderr


def test_llm_token_error_names_the_ways_to_provide_it(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/x/token")
    msg = missing_token_message("10.0.0.5:6379")
    assert "'10.0.0.5:6379' requires token authentication" in msg and "/x/token" in msg
    assert "ray get-auth-token" in msg and "RAY_AUTH_TOKEN=" in msg


# -- the batch job's helpers --------------------------------------------------------------------

@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("batch_ray_data_units", REPO / "examples" / "batch_ray_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resume_reads_complete_rows_and_ignores_a_torn_last_line(job, tmp_path):
    run = tmp_path / "run-1"
    run.mkdir()
    good = [{"id": i, "text": "x", "prompt_tokens": 1, "output_tokens": 1, "finish_reason": "length"} for i in (1, 2)]
    (run / "a.json").write_text("".join(json.dumps(r) + "\n" for r in good) + '{"id": 3, "text": "tor')
    (run / "b.json").write_text(json.dumps({**good[0], "id": "1"}) + "\n")   # the string "1" is another id
    assert job.ids_already_written(tmp_path) == {"1", "2", '"1"'}
    skip = job.SkipDone(job.ids_already_written(tmp_path))
    out = skip({"id": np.array([1, 3, 2, 4]), "prompt": np.array(["a", "b", "c", "d"])})
    assert out["id"].tolist() == [3, 4] and out["prompt"].tolist() == ["b", "d"]


def test_rows_take_their_own_sampling_fields_and_reject_unknown_ones(job):
    rows = job.rows_of({"id": np.array([0, 1]), "prompt": np.array(["a", "b"]),
                        "max_tokens": np.array([5.0, np.nan]), "temperature": np.array([None, 0.5], dtype=object)})
    assert rows == [{"id": 0, "prompt": "a", "max_tokens": 5.0}, {"id": 1, "prompt": "b", "temperature": 0.5}]
    defaults = {"max_tokens": 64, "temperature": 0.0}
    p0, p1 = (job.sampling_for(r, defaults) for r in rows)
    assert (p0.max_tokens, p0.temperature, p1.max_tokens, p1.temperature) == (5, 0.0, 64, 0.5)
    with pytest.raises(ValueError, match=r"row id=7 has unknown field\(s\) \['max_token'\]"):
        job.sampling_for({"id": 7, "prompt": "x", "max_token": 3}, defaults)


def test_batch_job_arguments_are_checked(job):
    with pytest.raises(SystemExit):
        job.parse_args(["--input", "x", "--output", "y"])            # neither --model nor --deployment
    with pytest.raises(SystemExit):
        job.parse_args(["--model", "m", "--input", "x", "--output", "y", "--concurrency", "0"])
    args = job.parse_args(["--deployment", "shardline", "--input", "x", "--output", "y"])
    assert args.deployment == "shardline" and args.model is None


# -- the pre-flight's per-node checks -----------------------------------------------------------

def test_model_check_finds_missing_resized_and_simulated_missing_folders(tiny_llama_dir, tmp_path, monkeypatch):
    expected = model_files(str(tiny_llama_dir))
    assert "config.json" in expected and any(n.endswith(".safetensors") for n in expected)
    assert check_model_here(str(tiny_llama_dir), expected) is None
    assert "does not exist on this node" in check_model_here(str(tmp_path / "nope"), expected)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in expected:
        (copy / name).write_bytes((tiny_llama_dir / name).read_bytes())
    (copy / "config.json").write_text("{}")
    assert "bytes on this node" in check_model_here(str(copy), expected)
    monkeypatch.setenv(SIMULATE_ENV, json.dumps({"missing": [str(tiny_llama_dir.parent)]}))
    assert "does not exist on this node" in check_model_here(str(tiny_llama_dir), expected)


def test_preflight_report_names_the_first_broken_node():
    rows = [NodeRow("10.0.0.1", "a" * 20, ["pp0tp0"], {"collectives": "ok"}),
            NodeRow("10.0.0.2", "b" * 20, ["pp1tp0"], {"collectives": "ok"}, ["torch 2.0 differs"])]
    result = PreflightResult(rows, [], 1.5)
    assert not result.ok
    assert result.first_problem() == f"node 10.0.0.2 ({'b' * 12}): torch 2.0 differs"
    table = result.table().splitlines()
    assert len(table) == 4 and "FAIL: torch 2.0 differs" in table[2] and table[-1] == "pre-flight FAILED in 1.5 s"
