"""Serving fixtures: a real `shardline serve` process (its own local Ray, its own process group).

The server's Ray uses token authentication with a token file in the test's temp dir, so a
second driver (a test subprocess) joins it with the same RAY_AUTH_* variables.

`server` is the PP=2 x DP=2 server that test_http_errors.py and test_openai_server.py share (one
start-up for both files); the one test that kills one of its engines runs after every other test
that uses it (`pytest_collection_modifyitems` below).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sharding.dist import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
API_KEY = "test-key-" + secrets.token_hex(4)
MODEL = "tiny-llama"                       # --served-model-name
MAX_BODY, MAX_CHARS = 100_000, 4_000       # the shared server's --max-request-bytes, --max-prompt-chars
# the shared server's --max-queued-requests: Serve holds a request in its caller's queue until a replica
# is picked, and a burst waits there while the router probes the replicas' queue lengths - under load a
# 32-stream burst overflowed 20 (a 503 from Serve's proxy in CI), so it stays above every burst a test
# expects to be accepted whole
MAX_QUEUED = 64
EXTRA = {"ignore_eos": True}               # the random model emits EOS early; compare full lengths
LONG = 200                                 # tokens of a long stream
KILLS_ENGINE = "kills_server_engine"       # marks the test that leaves the shared server with a dead engine


@dataclass
class Server:
    url: str               # http://127.0.0.1:PORT
    ray_address: str       # the server's local Ray (GCS address), for connect()
    env: dict              # what a second driver needs to join it
    proc: subprocess.Popen
    log: Path
    exit_code: int | None = None   # after the block: how `shardline serve` ended on SIGTERM
    final_log: str = ""


def ray_env(tmp: str) -> dict:
    """No inherited RAY_*; Ray on loopback, temp files under `tmp`, token auth with a token file there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    token = Path(tmp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_TMPDIR=tmp,
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
               PYTHONPATH=str(REPO))
    return env


@contextmanager
def shardline_serve(args: list[str], start_timeout: float = 300.0):
    """Run `shardline serve ARGS --port FREE` in the foreground until the block ends, then SIGTERM it."""
    tmp = tempfile.mkdtemp(prefix="sv", dir="/tmp")   # short: Ray's unix socket paths are length-limited
    env = ray_env(tmp)
    port = free_port("127.0.0.1")
    log = Path(tmp) / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", *args, "--port", str(port)],
                                env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = None
    try:
        address = _wait_for_ready(proc, log, start_timeout)
        server = Server(f"http://127.0.0.1:{port}", address, {**env, "RAY_ADDRESS": address}, proc, log)
        yield server
    finally:
        code = stop_group(proc)
        if server is not None:
            server.exit_code, server.final_log = code, log.read_text()
        keep = os.environ.get("SHARDLINE_KEEP_SERVE_LOGS")   # a folder to copy the server's Ray logs to
        if keep:
            shutil.copytree(tmp, Path(keep) / Path(tmp).name, ignore_dangling_symlinks=True, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.sock", "sockets", "runtime_resources"))
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for_ready(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text()
        if "serving " in text and " at http" in text:
            return re.search(r"ray cluster: (\S+)", text).group(1)
        if proc.poll() is not None:
            raise AssertionError(f"shardline serve exited with {proc.returncode}:\n{text[-4000:]}")
        time.sleep(0.5)
    raise AssertionError(f"shardline serve not ready in {timeout:g} s:\n{log.read_text()[-4000:]}")


def stop_group(proc: subprocess.Popen, grace: float = 60.0) -> int | None:
    """SIGTERM to the command alone (its clean shutdown needs its Ray alive), then SIGKILL the group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        code = None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if code is None:
        proc.wait(timeout=10)
    return code


def stream_completion(url: str, prompt: list[int], started: threading.Event, result: dict) -> None:
    """One streamed completion of LONG tokens: sets `started` at its first chunk; fills status, reason, tokens."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": LONG, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            result["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                started.set()
                for c in chunk.get("choices", []):
                    result["reason"] = c.get("finish_reason") or result.get("reason")
                if chunk.get("usage"):
                    result["tokens"] = chunk["usage"]["completion_tokens"]
    finally:
        started.set()   # also when it failed before its first chunk: nobody waits in vain


@pytest.fixture(scope="package")
def server(tiny_llama_dir):
    """`shardline serve` at PP=2 x DP=2 on the tiny Llama, shared by this folder's tests (its start-up is the
    expensive part); at the end, SIGTERM with --drain-timeout 0 while a stream is in flight."""
    args = [str(tiny_llama_dir), "--served-model-name", MODEL,
            "--pipeline-parallel-size", "2", "--data-parallel-size", "2", "--name", "t",
            "--api-key", API_KEY, "--max-ongoing-requests", "100", "--max-queued-requests", str(MAX_QUEUED),
            "--max-num-seqs", "8", "--max-waiting-requests", "32", "--max-request-bytes", str(MAX_BODY),
            "--max-prompt-chars", str(MAX_CHARS), "--drain-timeout", "0",
            "--max-restarts", "0"]   # fail-stop: the last test kills a worker to see a dead engine
    with shardline_serve(args) as srv:
        yield srv
        late = _in_flight_stream(srv)
    # SIGTERM with --drain-timeout 0: the stream in flight ended with finish_reason "abort"; the command
    # deleted its application and stopped its Ray, and exited 0
    late.join(timeout=120)
    assert late.result["status"] == 200 and late.result["reason"] == "abort", late.result
    assert late.result["tokens"] < LONG
    assert srv.exit_code == 0 and "stopped t" in srv.final_log, srv.final_log[-3000:]
    assert "drained t: 0 finished, 1 aborted" in srv.final_log, srv.final_log[-3000:]


def _in_flight_stream(srv) -> threading.Thread:
    """A long stream that has started (retried past a replica the last test killed), left running."""
    for _ in range(20):
        started, result = threading.Event(), {}
        t = threading.Thread(target=stream_completion, args=(srv.url, [5, 6], started, result))
        t.result = result
        t.start()
        if started.wait(60) and result.get("status") == 200:
            return t
        t.join(timeout=60)
    raise AssertionError(f"no stream could start: {result}")


@pytest.fixture(scope="package")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def metrics(server) -> dict:
    """The server's /metrics as {name or name[finished_reason]: value}, histogram buckets left out."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("" if "finished_reason" not in s.labels else f"[{s.labels['finished_reason']}]")
            if "le" not in s.labels:
                out[key] = s.value
    return out


def settled_metrics(server) -> dict:
    """Metrics once the replicas' pushes (every 0.25 s) have caught up: two readings 1 s apart agree."""
    last = metrics(server)
    for _ in range(30):
        time.sleep(1.0)
        now = metrics(server)
        if now == last:
            return now
        last = now
    raise AssertionError("the metrics never settled")


def no_leak(err: dict) -> None:
    """An error body names the problem and shows nothing of the server: no traceback, no file path."""
    text = json.dumps(err)
    assert err["message"] and "Traceback" not in text and ".py" not in text
    assert not any(root in text for root in ("/home/", "/tmp/", "/work/", "/root/", "/usr/")), text


def pytest_configure(config):
    config.addinivalue_line("markers", f"{KILLS_ENGINE}: kills an engine of the shared `server`; runs after "
                            "every other test that uses it")


def pytest_collection_modifyitems(items):
    """Whatever order the files come in, a `kills_server_engine` test runs after the shared server's other users."""
    killers = [i for i in items if i.get_closest_marker(KILLS_ENGINE)]
    users = [i for i in items if "server" in getattr(i, "fixturenames", ()) and i not in killers]
    if not killers or not users:
        return
    for item in killers:
        items.remove(item)
    at = items.index(users[-1]) + 1
    items[at:at] = killers
