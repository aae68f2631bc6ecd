"""End to end: a real `ray start --head`, then `ray job submit --working-dir .` of the example.

The job uploads the repository (without .venv), joins the cluster through RAY_ADDRESS, runs the
model at PP=2 on the cluster's workers and prints its generations. The head runs in its own
process group, which the fixture terminates (never `ray stop`: it would kill every Ray on the
machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from sharding.dist import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _env(tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",   # `python` in the job = this venv's
               RAY_TMPDIR=tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    return env


@pytest.fixture
def ray_head():
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")   # short: Ray's unix socket paths have a length limit
    env = _env(tmp)
    dashboard, gcs_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--num-cpus=2",
           f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
           "--include-dashboard=true", "--block"]
    head = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    json.load(r)
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    out = head.stdout.read().decode(errors="replace") if head.poll() is not None else ""
                    pytest.fail(f"ray head did not come up at {url}: {out[-2000:]}")
                time.sleep(1)
        yield url, env, f"127.0.0.1:{gcs_port}"
    finally:
        _stop_group(head)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the --block parent exits first; its children share the group
        time.sleep(1)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return


def test_ray_job_submit_runs_the_example_on_the_cluster(ray_head, tiny_llama_dir):
    url, env, _ = ray_head
    cmd = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".",
           "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "benchmarks/results"]}), "--",
           "python", "examples/offline_generate.py", "--model", str(tiny_llama_dir), "--pp", "2",
           "--max-tokens", "8"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log
    assert "engine up" in log and "tp=1 pp=2 dp=1" in log
    assert log.count(">>> ") >= 5, log[-4000:]   # four prompts and the chat
    # the text is what transformers generates for each of the example's prompts
    from tokenizers import Tokenizer

    from tests.fixtures.reference import hf_greedy

    tok = Tokenizer.from_file(str(tiny_llama_dir / "tokenizer.json"))
    example = {}
    exec(compile((REPO / "examples" / "offline_generate.py").read_text(), "offline_generate.py", "exec"), example)
    for prompt in example["PROMPTS"]:
        tokens, _ = hf_greedy(str(tiny_llama_dir), tok.encode(prompt).ids, 8, stop_at_eos=True)
        reason = "stop" if tokens[-1] in (0,) and len(tokens) < 8 else "length"
        want = f">>> {prompt}\n{tok.decode(tokens, skip_special_tokens=True)}  [{reason}]"
        assert want in log, f"{want!r} not in the job's output:\n{log[-3000:]}"
    # ... computed by ShardWorker actors of THIS cluster (a Ray started inside the job would hold them)
    listed = subprocess.run([str(BIN / "ray"), "list", "actors", "--address", url, "--filter",
                             "class_name=ShardWorker", "--format", "json", "--limit", "100"],
                            env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert len(json.loads(listed.stdout)) == 2, listed.stdout   # PP=2: one worker per stage


def test_llm_joins_a_running_cluster_by_address(ray_head, tiny_llama_dir):
    """A driver outside the cluster passes address= and its workers run on the cluster's node."""
    _, env, gcs = ray_head
    script = (
        "import json, sys\n"
        "from cluster import LLM, SamplingParams\n"
        f"with LLM({str(tiny_llama_dir)!r}, pipeline_parallel_size=2, address={gcs!r}) as llm:\n"
        "    out = llm.generate([{'prompt_token_ids': [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4),\n"
        "                       use_tqdm=False)\n"
        "    print(json.dumps(out[0].outputs[0].token_ids))\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    from tests.fixtures.reference import hf_greedy

    assert json.loads(done.stdout.strip().splitlines()[-1]) == hf_greedy(str(tiny_llama_dir), [5, 6, 7], 4,
                                                                         stop_at_eos=True)[0]
