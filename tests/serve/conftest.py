"""Serving fixtures: a real `shardline serve` process (its own local Ray, its own process group).

The server's Ray uses token authentication with a token file in the test's temp dir, so a
second driver (a test subprocess) joins it with the same RAY_AUTH_* variables.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sharding.dist import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
API_KEY = "test-key-" + secrets.token_hex(4)


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
