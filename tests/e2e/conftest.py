"""End-to-end fixtures: a real Ray head started with `cluster/launch/start_head.sh`, token auth ON.

Each head gets its own short temp dir (Ray's unix socket paths are limited to ~108 bytes), its
own ports, its own launch registry (SHARDLINE_STATE_DIR) and its own cluster token, in a file
in that temp dir passed through RAY_AUTH_TOKEN_PATH (never the user's ~/.ray/auth_token).
The environment is minimal (no inherited RAY_* variables); RAY_AUTH_MODE=token is set so that
clients (`ray job submit`, drivers) send the token. Teardown runs `stop.sh`, which ends only
the processes of this head (never `ray stop`), and fails the test if any of them survived.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from sharding.dist import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LAUNCH = REPO / "cluster" / "launch"


def minimal_env(tmp: Path, **extra: str) -> dict:
    """A clean shell's environment: this venv first on PATH, HOME and TMPDIR inside `tmp`, no RAY_*."""
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": f"{BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "TMPDIR": str(tmp),
           "LANG": "C.UTF-8", "SHARDLINE_STATE_DIR": str(tmp / "state")}
    env.update(extra)
    return env


def processes_naming(text: str) -> list[int]:
    """PIDs of processes whose command line contains `text` (a head's temp dir names all its processes)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


@dataclass
class LaunchedHead:
    tmp: Path
    env: dict          # for clients: token path and RAY_AUTH_MODE=token
    address: str       # cluster (GCS) address, the last line start_head.sh printed
    jobs_url: str      # job-submission (dashboard) address
    start_output: str

    def script(self, name: str, *args: str, timeout: float = 300, env: dict | None = None,
               check: bool = False) -> subprocess.CompletedProcess:
        done = subprocess.run([str(LAUNCH / name), *args], cwd=REPO, env=env or self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, f"{name} {args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done


def start_launched_head(num_cpus: int = 2) -> LaunchedHead:
    tmp = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))
    env = minimal_env(tmp, RAY_AUTH_TOKEN_PATH=str(tmp / "cluster_token"))
    port, dash = free_port("127.0.0.1"), free_port("127.0.0.1")
    done = subprocess.run([str(LAUNCH / "start_head.sh"), "--port", str(port), "--dashboard-port", str(dash),
                           "--temp-dir", str(tmp / "head"), "--num-cpus", str(num_cpus), "--node-ip-address",
                           "127.0.0.1", "--object-store-memory", str(300 * 2**20)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    head = LaunchedHead(tmp, {**env, "RAY_AUTH_MODE": "token"}, f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}",
                        done.stdout + done.stderr)
    if done.returncode != 0:
        stop_launched_head(head)
        pytest.fail(f"start_head.sh failed ({done.returncode}):\n{head.start_output[-3000:]}")
    return head


def stop_launched_head(head: LaunchedHead) -> list[int]:
    """stop.sh, then whatever survived (there should be nothing) is killed and returned."""
    subprocess.run([str(LAUNCH / "stop.sh")], cwd=REPO, env=head.env, capture_output=True, text=True, timeout=120)
    survivors = processes_naming(str(head.tmp))
    for pid in survivors:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    shutil.rmtree(head.tmp, ignore_errors=True)
    return survivors


@pytest.fixture(scope="module")
def launched_head():
    """A head from start_head.sh (2 CPUs, token auth on), shared by one test module."""
    head = start_launched_head()
    try:
        yield head
    finally:
        survivors = stop_launched_head(head)
        assert not survivors, f"stop.sh left processes of the test's head running: {survivors}"


@pytest.fixture(scope="module")
def ray_head(launched_head):
    """(job-submission URL, client env with the token, cluster address) of a launched head."""
    return launched_head.jobs_url, launched_head.env, launched_head.address
