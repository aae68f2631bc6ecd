"""End to end: a real Ray head (`cluster/launch/start_head.sh`, token authentication on), then
`ray job submit --working-dir .` of the example.

The job uploads the repository (without .venv), joins the cluster through RAY_ADDRESS, runs the
model at PP=2 on the cluster's workers and prints its generations. The `ray_head` fixture
(tests/e2e/conftest.py) gives the job address, a client environment carrying the test's own
cluster token, and the cluster address; its teardown runs `stop.sh` (never `ray stop`: it would
kill every Ray on the machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


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
