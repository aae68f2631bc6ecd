"""Issue 12 test 12 (graceful shutdown): SIGTERM to a foreground `shardline serve` drains it.

A D=1 server with --drain-timeout 120 gets two long streams, then SIGTERM: new requests are
refused with 503 + Retry-After while the two streams run to their full length, then the command
exits 0 having reported the drain. (--drain-timeout 0, where in-flight requests end with
finish_reason "abort", is the module server's shutdown in test_openai_server.py.)
"""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import pytest

from tests.serve.conftest import API_KEY, LONG, MODEL, shardline_serve, stream_completion

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.timeout(600)]


def test_sigterm_refuses_new_requests_and_finishes_running_ones(tiny_llama_dir):
    args = [str(tiny_llama_dir), "--served-model-name", MODEL, "--name", "dr", "--api-key", API_KEY,
            "--drain-timeout", "120"]
    with shardline_serve(args) as srv:
        results = [{}, {}]
        started = [threading.Event(), threading.Event()]
        threads = [threading.Thread(target=stream_completion, args=(srv.url, p, ev, res))
                   for p, ev, res in zip(([5, 6, 7], [11, 12]), started, results, strict=True)]
        for t in threads:
            t.start()
        assert all(ev.wait(120) for ev in started), results
        srv.proc.send_signal(signal.SIGTERM)
        refused = None
        for _ in range(240):   # the replica hears of the drain at its next metrics push (0.25 s)
            r = httpx.post(f"{srv.url}/v1/completions", json={"model": MODEL, "prompt": [5], "max_tokens": 1},
                           headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
            if r.status_code == 503:
                refused = r
                break
            time.sleep(0.25)
        assert refused is not None, "new requests were still accepted while draining"
        assert int(refused.headers["retry-after"]) >= 1
        assert "shutting down" in refused.json()["error"]["message"]
        for t in threads:
            t.join(timeout=300)
        assert srv.proc.wait(timeout=120) == 0
    assert results == [{"status": 200, "reason": "length", "tokens": LONG}] * 2, results
    assert re.search(r"drained dr: [23] finished, 0 aborted", srv.final_log), srv.final_log[-3000:]
    assert "stopped dr" in srv.final_log
