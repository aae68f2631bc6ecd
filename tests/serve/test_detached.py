"""`shardline serve --detach` on a real `ray start --head` (own port, temp dir, token auth, process group).

The command returns; the application outlives it; `connect()` from a fresh driver and from a
`ray job submit` job (examples/serve_client.py) generate greedy tokens equal to `transformers`
(a D=1 engine, the same tokens the D=2 server in test_openai_server.py gives); the Ray Data batch
job with `--deployment` writes every row, equal to offline `LLM.generate`; `shardline stop`
leaves no Shardline actor, placement group or process behind, also after SHARDLINE_LEAK_SERVE_CYCLES
detach/stop cycles in all (`make leaks`: 5), and the Ray daemons' RSS and fds do not grow.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from sharding.dist import free_port
from tests.e2e.test_cluster_ops import offline_texts, output_rows
from tests.fixtures.reference import hf_greedy
from tests.serve.conftest import BIN, REPO, ray_env

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.timeout(600)]

PROMPT = [5, 6, 7]
BATCH_PROMPTS = ["hello there", "once upon a time", "the cat", "a b c", "numbers 1 2 3"]
SHARDLINE_CLASSES = ("ShardWorker", "ShardlineEngine", "OpenAIIngress", "MetricsHub")


@pytest.fixture(scope="module")
def ray_head():
    tmp = tempfile.mkdtemp(prefix="sd", dir="/tmp")
    env = ray_env(tmp)
    dashboard, gcs_port, agent = (free_port("127.0.0.1") for _ in range(3))
    # the job agent's port too (Ray's default, 52365, may be another Ray's on a shared machine: `ray job
    # submit` then finds "No available agent" for good), as cluster/launch/start_head.sh does
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", "--num-cpus=2", f"--dashboard-port={dashboard}",
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
         f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats", "--block"],
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    HEAD_PIDS[url] = head.pid
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                    break
            except urllib.error.HTTPError:   # 401: up, and asking for the token, as it should
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray head did not come up at {url}")
                time.sleep(1)
        yield url, {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}
    finally:
        _kill_head(head)
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_head(head: subprocess.Popen) -> None:
    """SIGKILL the head's process group, then whatever of its process tree outlived it (workers run in groups
    of their own). Not SIGTERM: Ray's handler drains the node and then stops its processes one by one with a
    second's grace each, 20-30 s in all here, and this test has already checked that nothing of Shardline
    is left."""
    try:
        tree = psutil.Process(head.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    head.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _run(cmd: list[str], env: dict, timeout: float = 300) -> str:
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    return done.stdout


def _submit_job(url: str, env: dict, client_args: list[str]) -> str:
    """`ray job submit` of `python CLIENT_ARGS` with this checkout as the working dir; the job's log."""
    job = [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--runtime-env-json",
           json.dumps({"excludes": [".venv", ".git", "benchmarks/results"]}), "--", "python", *client_args]
    for _ in range(30):   # the head's job agent can lag its dashboard by a few seconds
        done = subprocess.run(job, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        if "No available agent" not in done.stdout + done.stderr:
            break
        time.sleep(2)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log


LEFTOVERS = """
import json, ray
from ray.util.state import list_actors, list_placement_groups
ray.init()
actors = [a.class_name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)]
groups = [g.placement_group_id for g in list_placement_groups(filters=[("state", "!=", "REMOVED")], limit=1000)]
print(json.dumps({"actors": actors, "groups": groups}))
"""


def test_detached_app_outlives_the_command_and_serves_drivers_and_jobs(ray_head, tiny_llama_dir, tmp_path):
    url, env = ray_head
    port = free_port("127.0.0.1")
    t0 = time.monotonic()
    out = _run([sys.executable, "-m", "cluster.cli", "serve", str(tiny_llama_dir), "--detach", "--name", "det",
                "--port", str(port)], env)
    assert "detached" in out and "healthy after" in out
    # the command has exited; the application still answers
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
        assert r.status == 200
    want = hf_greedy(str(tiny_llama_dir), PROMPT, 8, stop_at_eos=True)[0]
    client = [sys.executable, "examples/serve_client.py", "--name", "det", "--max-tokens", "8", "--json",
              "--token-ids", ",".join(map(str, PROMPT))]
    rows = [{"id": f"r{i}", "prompt": p} for i, p in enumerate(BATCH_PROMPTS)]
    src, out_dir = tmp_path / "rows.jsonl", tmp_path / "out"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    batch = [sys.executable, "examples/batch_ray_data.py", "--deployment", "det", "--input", str(src), "--output",
             str(out_dir), "--max-tokens", "6", "--batch-size", "2", "--concurrency", "2"]
    # the clients do not depend on each other, so they run at once (most of each one's time is its own start-up):
    # a fresh driver, the same client as a `ray job submit` job, `shardline status`, and the Ray Data batch job,
    # which sends its rows to the running deployment instead of starting engines
    with ThreadPoolExecutor(4) as pool:
        direct = pool.submit(_run, client, env)
        job = pool.submit(_submit_job, url, env, client[1:])
        status = pool.submit(_run, [sys.executable, "-m", "cluster.cli", "status"], env)
        batched = pool.submit(_run, batch, env)
        offline = offline_texts(tiny_llama_dir, BATCH_PROMPTS, 6)
    res = json.loads(direct.result().strip().splitlines()[-1])
    assert res["generate"] == [want] and res["stream"] == want and res["replicas"] == 1
    log = job.result()
    assert "succeeded" in log
    res = json.loads(next(line for line in log.splitlines() if line.startswith('{"generate"')))
    assert res["generate"] == [want] and res["stream"] == want
    assert "det: RUNNING" in status.result() and "requests=" in status.result()
    batched.result()
    got = {r["id"]: r for r in output_rows(out_dir)}
    assert sorted(got) == [r["id"] for r in rows]
    assert [got[r["id"]]["text"] for r in rows] == offline
    # stop: every Shardline actor, placement group and process is gone
    assert "stopped det" in _run([sys.executable, "-m", "cluster.cli", "stop", "det"], env)
    marks = [_assert_clean(url, env, "the first cycle")]
    print(f"detached round trip in {time.monotonic() - t0:.0f} s")
    _another_port_is_refused(env, tiny_llama_dir, port)
    # issue 12 test 12: more serve --detach / stop cycles (`make leaks`: 5 in all) leak nothing either
    for cycle in range(1, SERVE_CYCLES):
        _detach_stop_cycle(env, tiny_llama_dir, port)
        marks.append(_assert_clean(url, env, f"cycle {cycle}"))
    print(f"{SERVE_CYCLES} detach/stop cycles: Ray daemons (RSS bytes, fds) first {marks[0]} last {marks[-1]}")
    for name, (rss, fds) in marks[-1].items():
        rss0, fds0 = marks[0][name]
        assert fds - fds0 <= 16 and rss - rss0 <= 64 * 2**20, (name, marks)


SERVE_CYCLES = int(os.environ.get("SHARDLINE_LEAK_SERVE_CYCLES", "1"))
SHARDLINE_PROCS = ("ray::ShardWorker", "ShardlineEngine", "OpenAIIngress", "MetricsHub")
HEAD_PIDS: dict[str, int] = {}   # dashboard url -> pid of `ray start --block` (every session process descends)


def _session(head_pid: int) -> dict:
    """Processes under the `ray start` head: the Shardline ones, and the Ray daemons' (RSS, open fds)."""
    ours, daemons = [], {}
    for p in psutil.Process(head_pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if any(name in cmd for name in SHARDLINE_PROCS):
                ours.append(cmd[:120])
            elif any(d in cmd for d in ("gcs_server", "raylet")):
                daemons[cmd.split()[0].rsplit("/", 1)[-1]] = (p.memory_info().rss, p.num_fds())
        except psutil.Error:   # exited meanwhile
            pass
    return {"ours": ours, "daemons": daemons}


def _another_port_is_refused(env: dict, model, port: int) -> None:
    """Serve keeps one HTTP proxy per cluster (still at `port` after `stop`); asking for another port is a
    clear error naming the one to use, before anything is deployed - not a deployment nobody can reach."""
    other = free_port("127.0.0.1")
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", str(model), "--detach", "--name", "cyc",
                           "--port", str(other)], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"--port {other}: Ray Serve already runs" in done.stderr and f"pass --port {port}" in done.stderr


def _detach_stop_cycle(env: dict, model, port: int) -> None:
    """Another application joins the cluster's Serve proxy (no --port: the proxy's), answers, and stops."""
    out = _run([sys.executable, "-m", "cluster.cli", "serve", str(model), "--detach", "--name", "cyc"], env)
    assert f"at http://127.0.0.1:{port}/v1" in out, out
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
        assert r.status == 200
    assert "stopped cyc" in _run([sys.executable, "-m", "cluster.cli", "stop", "cyc"], env)


def _assert_clean(url: str, env: dict, what: str) -> dict:
    """No Shardline actor, placement group or process is left (within 30 s); -> the Ray daemons' (RSS, fds)."""
    deadline = time.monotonic() + 30
    while True:
        left = json.loads(_run([sys.executable, "-c", LEFTOVERS], env).strip().splitlines()[-1])
        session = _session(HEAD_PIDS[url])
        clean = (not [a for a in left["actors"] if any(c in a for c in SHARDLINE_CLASSES)]
                 and left["groups"] == [] and session["ours"] == [])
        if clean or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert clean, f"{what} left {left} {session['ours']}"
    return session["daemons"]
