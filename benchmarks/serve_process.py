"""`shardline serve` as a child process for the HTTP benchmarks (bench_serve.py, soak.py).

It runs in its own session (so stopping it takes its Ray with it) with its output in
`$RAY_TMPDIR/serve.log`; `start` returns once `/health` answers 200 and the command has
printed the address of the Ray cluster it runs on.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def start(model: str, port: int, env: dict, options: list[str]) -> tuple[subprocess.Popen, float, str]:
    """(process, seconds to the first healthy /health, Ray address) of `shardline serve MODEL OPTIONS`."""
    import httpx

    cmd = [sys.executable, "-m", "cluster.cli", "serve", model, "--port", str(port), *options]
    log = pathlib.Path(env["RAY_TMPDIR"]) / "serve.log"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"shardline serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    startup = time.perf_counter() - t0
    while "ray cluster:" not in log.read_text():
        time.sleep(0.1)
    return proc, startup, re.search(r"ray cluster: (\S+)", log.read_text()).group(1)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the command drains and deletes its app), then kill whatever is left of its session."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
