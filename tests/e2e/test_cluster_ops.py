"""End to end: the README's cluster flow, typed word for word into a clean shell, with token auth on.

One bash process (minimal environment: this venv on PATH, HOME and TMPDIR in the test's own temp
dir, so the token lands in a temp ~/.ray/auth_token and never the user's) receives the README's
`<!-- e2e: cluster-flow -->` block one command at a time, as a user would type it. Only the
environment differs from a user's: MODEL is the tiny test model (the README line keeps a set
MODEL), and SHARDLINE_NODE_IP / SHARDLINE_HEAD_PORT / SHARDLINE_DASHBOARD_PORT / SHARDLINE_NUM_CPUS
(defaults `start_head.sh` documents) keep the head on 127.0.0.1 and on free ports.

Along the way:
- start_head.sh comes up with token auth and prints the address last; preflight passes;
- the batch job (40 rows, PP=2, greedy) is killed half-way (its driver, SIGKILL), then the README's
  submit line is typed again: the job SUCCEEDED and every id is in the output exactly once, with
  the texts offline `LLM.generate` gives for the same prompts;
- without the token, submit.sh and start_worker.sh stop at once saying how to get it; a worker
  cannot join a loopback head and start_worker.sh says why (Ray's CLI refuses it: keeping a node on
  127.0.0.1 needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, with which `ray start --address` aborts;
  the cross-node placement is tested on `ray.cluster_utils.Cluster` in tests/ray/test_preflight.py);
- stop.sh leaves no process of this head.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sharding.dist import free_port
from tests.e2e.conftest import LAUNCH, REPO, minimal_env, processes_naming

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MARK = "__SHARDLINE_RC="


def readme_commands() -> list[str]:
    """The commands of the README's cluster-flow block (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- e2e: cluster-flow -->", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


class Shell:
    """A bash reading commands from a pipe, like a terminal a user types into."""

    def __init__(self, env: dict, cwd: Path) -> None:
        self.proc = subprocess.Popen(["bash", "--noprofile", "--norc"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                                     start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def type(self, command: str, timeout: float = 300, while_waiting=None) -> tuple[int, str]:
        self.proc.stdin.write(f"{command}\necho \"{MARK}$?\"\n")
        self.proc.stdin.flush()
        out, deadline = [], time.monotonic() + timeout
        while True:
            if while_waiting is not None:
                while_waiting()
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                assert time.monotonic() < deadline, f"`{command}` did not finish in {timeout}s:\n{''.join(out)}"
                continue
            if line.startswith(MARK):
                return int(line[len(MARK):]), "".join(out)
            out.append(line)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()


def output_rows(results: Path) -> list[dict]:
    rows = []
    for path in sorted(results.rglob("*.json")):
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:   # a torn last line of a killed run is not a row
                pass
    return rows


def offline_texts(model: Path, prompts: list[str], max_tokens: int) -> list[str]:
    from cluster import LLM, SamplingParams

    with LLM(str(model)) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def test_readme_cluster_flow_with_token_auth_resumes_a_killed_job_and_stops_cleanly(tiny_llama_dir):
    commands = readme_commands()
    assert (REPO / ".venv" / "bin" / "activate").exists(), "the README flow needs the project's .venv (make venv)"
    tmp = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))
    port, dash = free_port("127.0.0.1"), free_port("127.0.0.1")
    env = minimal_env(tmp, MODEL=str(tiny_llama_dir), SHARDLINE_NODE_IP="127.0.0.1", SHARDLINE_HEAD_PORT=str(port),
                      SHARDLINE_DASHBOARD_PORT=str(dash), SHARDLINE_NUM_CPUS="2",
                      PYTHONPATH=str(REPO))   # `shardline` runs this checkout even if the venv installed another
    home, results = Path(env["HOME"]), Path(env["HOME"]) / "batch" / "results"
    shell = Shell(env, REPO)
    stopped_early = []
    try:
        start, preflight, prompts, submit, show, stop = _pick(commands)
        for line in commands[:commands.index(start)]:
            rc, out = shell.type(line)
            assert rc == 0, f"`{line}` exited {rc}:\n{out}"

        # 1. the head: token auth on (the token is in the temp HOME), the address last
        rc, out = shell.type(start, timeout=180)
        assert rc == 0, out
        assert (home / ".ray" / "auth_token").stat().st_size > 0
        assert "token authentication ON" in out and "GLOO_SOCKET_IFNAME=lo" in out, out

        # 2. pre-flight
        rc, out = shell.type(preflight, timeout=180)
        assert rc == 0 and "pre-flight passed" in out, out
        assert re.search(r"127\.0\.0\.1 \w+\s+pp0tp0,pp1tp0 .* ok\s+OK", out), out

        # 3. without the token: clear messages, at once
        no_token = {**env, "HOME": str(tmp / "empty-home")}
        done = subprocess.run([str(LAUNCH / "submit.sh"), "--address", f"127.0.0.1:{port}", "--", "true"],
                              cwd=REPO, env=no_token, capture_output=True, text=True, timeout=60)
        assert done.returncode == 3 and "ray get-auth-token" in done.stderr and "auth_token" in done.stderr, done
        done = subprocess.run([str(LAUNCH / "start_worker.sh"), f"127.0.0.1:{port}"], cwd=REPO, env=no_token,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "loopback" in done.stderr, done

        # 4. the batch job, stopped half-way, then the same line again
        rc, out = shell.type(prompts)
        assert rc == 0, out

        def kill_job_once_rows_appear():
            # the job's driver is killed outright (SIGKILL) the moment its first rows are on disk
            if not stopped_early and output_rows(results):
                drivers = [p for p in processes_naming(str(results))   # the job's driver, not submit.sh / ray job
                           if "batch_ray_data.py" in _cmdline(p) and "submit" not in _cmdline(p)]
                for pid in drivers:
                    os.kill(pid, signal.SIGKILL)
                stopped_early.append(drivers)

        rc, out = shell.type(submit, timeout=300, while_waiting=kill_job_once_rows_appear)
        assert stopped_early and stopped_early[0], f"the job ended before it wrote any row:\n{out[-3000:]}"
        assert rc != 0 and "FAILED" in out, out[-3000:]
        half = {r["id"] for r in output_rows(results)}
        assert 0 < len(half) < 40, f"{len(half)} rows after the stop: not half-way"

        rc, out = shell.type(submit, timeout=300)
        assert rc == 0 and "SUCCEEDED" in out, out[-3000:]
        assert f"{len(half)} ids already in" in out
        rows = output_rows(results)
        ids = [r["id"] for r in rows]
        assert sorted(ids) == list(range(40)), f"ids not exactly once: {sorted(ids)}"
        assert set(rows[0]) == {"id", "text", "prompt_tokens", "output_tokens", "finish_reason"}

        # 5. the texts are offline LLM.generate's
        by_id = {r["id"]: r for r in rows}
        wanted = [json.loads(line) for line in (home / "batch" / "prompts.jsonl").read_text().splitlines()]
        texts = offline_texts(tiny_llama_dir, [w["prompt"] for w in wanted], max_tokens=32)
        assert [by_id[w["id"]]["text"] for w in wanted] == texts
        assert all(by_id[w["id"]]["output_tokens"] <= 32 and by_id[w["id"]]["prompt_tokens"] > 0 for w in wanted)

        rc, out = shell.type(show)
        assert rc == 0 and out.count('"finish_reason"') == 3, out

        # 6. stop: nothing of this head is left
        rc, out = shell.type(stop, timeout=120)
        assert rc == 0 and "stopped head" in out, out
        assert processes_naming(str(tmp)) == []
    finally:
        shell.close()
        leftovers = processes_naming(str(tmp))
        if leftovers:   # a failed run: stop what the flow started, then say so
            subprocess.run([str(LAUNCH / "stop.sh")], cwd=REPO, env=env, capture_output=True, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not leftovers, f"processes of the test's head were left running: {leftovers}"


def _pick(commands: list[str]) -> tuple[str, ...]:
    def one(fragment: str) -> str:
        found = [c for c in commands if fragment in c]
        assert len(found) == 1, f"README cluster-flow block: expected one command with {fragment!r}, got {found}"
        return found[0]

    return (one("start_head.sh"), one("shardline preflight"), one("> ~/batch/prompts.jsonl"),
            one("submit.sh"), one("cat "), one("stop.sh"))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
