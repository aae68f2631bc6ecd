"""Serving metrics with vLLM's meanings, kept in plain Python (no prometheus here: `cluster/` exports).

One `EngineMetrics` per engine. `observe(out, now)` sees every output the step loop produces;
`snapshot(engine)` returns a plain dict (picklable, summable across replicas):

    counters   prompt_tokens, generation_tokens, request_success (by finish reason),
               replica_restarts (replicas rebuilt after a failure), replica_recovery_seconds (their sum)
    gauges     num_requests_running, num_requests_waiting, kv_cache_usage_perc (0..1)
    histograms time_to_first_token_seconds, time_per_output_token_seconds,
               e2e_request_latency_seconds   ({"buckets": [...], "counts": [...], "sum", "count"})
"""

from __future__ import annotations

import bisect
import time

from scheduler.request import RequestOutput

# vLLM's bucket bounds (seconds); +Inf is implicit (the last count)
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0]
E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0]


class Histogram:
    def __init__(self, buckets: list[float]) -> None:
        self.buckets = list(buckets)
        self.counts = [0] * (len(buckets) + 1)   # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def to_dict(self) -> dict:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum, "count": self.count}


class _Timing:
    __slots__ = ("arrival", "first", "tokens")

    def __init__(self, arrival: float) -> None:
        self.arrival, self.first, self.tokens = arrival, None, 0


class EngineMetrics:
    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.request_success: dict[str, int] = {}
        self.num_requests = 0          # requests ever started (for per-replica spreading in stats)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self._timing: dict[str, _Timing] = {}

    def started(self, request_id: str, now: float | None = None) -> None:
        self._timing[request_id] = _Timing(time.monotonic() if now is None else now)
        self.num_requests += 1

    def observe(self, out: RequestOutput, now: float | None = None) -> None:
        """A delta output of a started request (tokens since the last one)."""
        t = self._timing.get(out.request_id)
        if t is None:
            return
        now = time.monotonic() if now is None else now
        new = sum(len(c.token_ids) for c in out.outputs)
        if new and t.first is None:
            t.first = now
            self.ttft.observe(now - t.arrival)
            self.prompt_tokens += len(out.prompt_token_ids)
        t.tokens += new
        self.generation_tokens += new
        if out.finished:
            del self._timing[out.request_id]
            self.e2e.observe(now - t.arrival)
            if t.first is not None and t.tokens > 1:
                self.tpot.observe((now - t.first) / (t.tokens - 1))
            reason = (out.outputs[0].finish_reason if out.outputs else None) or "abort"
            self.request_success[reason] = self.request_success.get(reason, 0) + 1

    def snapshot(self, engine) -> dict:
        """Counters, gauges (read from the engine's schedulers) and histograms as a plain dict."""
        running = sum(len(s.running) for s in engine.schedulers)
        waiting = sum(len(s.waiting) for s in engine.schedulers)
        managers = {id(s.block_manager): s.block_manager for s in engine.schedulers}.values()   # lanes share one
        total = sum(b.num_blocks for b in managers)
        free = sum(b.num_free_blocks for b in managers)
        return {
            "num_requests_running": running, "num_requests_waiting": waiting,
            "kv_cache_usage_perc": (total - free) / total if total else 0.0,
            "all_blocks_free": engine.all_blocks_free(),
            "prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
            "request_success": dict(self.request_success), "num_requests": self.num_requests,
            "replica_restarts": len(engine.recoveries),
            "replica_recovery_seconds": sum(r.recovery_s for r in engine.recoveries),
            "time_to_first_token_seconds": self.ttft.to_dict(),
            "time_per_output_token_seconds": self.tpot.to_dict(),
            "e2e_request_latency_seconds": self.e2e.to_dict(),
        }
