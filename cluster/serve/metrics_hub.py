"""`MetricsHub`: one small deployment per application that sees every engine replica.

Why a hub: /metrics and `stats()` must cover every replica, but a Serve handle routes each call
to ONE replica, so nobody can ask them all. Instead every engine replica pushes its snapshot
(`scheduler.metrics`) here every 0.25 s; /metrics sums them into Prometheus text and `stats()`
shows them per replica (so data-parallel spreading is visible). Serve owns the hub's lifetime,
so deleting the application removes it (no stray actor). Ray's own metrics system was the other
option; it exports per node on a separate port, which /metrics on the HTTP port would have to
scrape and merge.

The hub also carries aborts by request id: `abort(rid)` is remembered for ABORT_TTL_S and
handed to whichever replica reports that id at its next push; and the drain order of a graceful
shutdown (`drain(timeout_s)`), which every replica receives at its next push.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from ray import serve

from cluster.serve.config import HUB_DEPLOYMENT

PREFIX = "shardline:"
STALE_S = 10.0       # a replica silent this long no longer counts in the gauges (its counters stay)
ABORT_TTL_S = 60.0
HISTOGRAMS = {
    "time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "time_per_output_token_seconds": "Histogram of time per output token in seconds.",
    "e2e_request_latency_seconds": "Histogram of end to end request latency in seconds.",
}


class _Collector:
    """Sums the replicas' snapshots into metric families with vLLM's names and meanings."""

    def __init__(self, model_name: str, replicas: dict) -> None:
        self.labels = {"model_name": model_name}
        now = time.monotonic()
        self.all = [snap for _, snap in replicas.values()]
        self.live = [snap for at, snap in replicas.values() if now - at < STALE_S]

    def collect(self):
        names, values = list(self.labels), list(self.labels.values())
        for key, doc in (("num_requests_running", "Number of requests in model execution batches."),
                         ("num_requests_waiting", "Number of requests waiting to be processed.")):
            g = GaugeMetricFamily(PREFIX + key, doc, labels=names)
            g.add_metric(values, sum(s[key] for s in self.live))
            yield g
        g = GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage "
                              "(mean over live replicas).", labels=names)
        g.add_metric(values, sum(s["kv_cache_usage_perc"] for s in self.live) / max(len(self.live), 1))
        yield g
        for key, doc in (("prompt_tokens", "Number of prefill tokens processed."),
                         ("generation_tokens", "Number of generation tokens processed."),
                         ("replica_restarts", "Engine replicas rebuilt after a worker failed (Shardline).")):
            c = CounterMetricFamily(PREFIX + key, doc, labels=names)
            c.add_metric(values, sum(s.get(key, 0) for s in self.all))
            yield c
        c = CounterMetricFamily(PREFIX + "request_success", "Count of finished requests by finish reason.",
                                labels=[*names, "finished_reason"])
        reasons = {r for s in self.all for r in s["request_success"]}
        for r in sorted(reasons):
            c.add_metric([*values, r], sum(s["request_success"].get(r, 0) for s in self.all))
        yield c
        for key, doc in HISTOGRAMS.items():
            yield self._histogram(key, doc, names, values)

    def _histogram(self, key: str, doc: str, names: list, values: list) -> HistogramMetricFamily:
        h = HistogramMetricFamily(PREFIX + key, doc, labels=names)
        snaps = [s[key] for s in self.all]
        if not snaps:
            h.add_metric(values, [("+Inf", 0)], 0.0)
            return h
        bounds = snaps[0]["buckets"]
        counts = [sum(s["counts"][i] for s in snaps) for i in range(len(bounds) + 1)]
        cumulative, total = [], 0
        for bound, n in zip([*map(str, bounds), "+Inf"], counts, strict=True):
            total += n
            cumulative.append((bound, total))
        h.add_metric(values, cumulative, sum(s["sum"] for s in snaps))
        return h


# The deployment class comes last: Serve serializes it when it is decorated, so every module-level
# helper it uses must already exist by then.
@serve.deployment(name=HUB_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
class MetricsHub:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.replicas: dict[str, tuple[float, dict]] = {}   # replica id -> (received at, snapshot)
        self.aborts: dict[str, float] = {}                   # request id -> expiry
        self.drain_s: float | None = None                    # set once a graceful shutdown began

    def push(self, replica_id: str, snapshot: dict) -> dict:
        """Store a replica's snapshot; return {"aborts": the aborts meant for it, "drain_s": None or seconds}."""
        now = time.monotonic()
        self.replicas[replica_id] = (now, snapshot)
        self.aborts = {rid: exp for rid, exp in self.aborts.items() if exp > now}
        mine = [rid for rid in snapshot.get("request_ids", ()) if rid in self.aborts]
        for rid in mine:
            del self.aborts[rid]
        return {"aborts": mine, "drain_s": self.drain_s}

    def abort(self, request_id: str) -> None:
        self.aborts[request_id] = time.monotonic() + ABORT_TTL_S

    def drain(self, timeout_s: float) -> None:
        """Tell every replica (at its next push) to drain: refuse new requests, finish or abort the rest."""
        self.drain_s = float(timeout_s)

    def stats(self) -> dict:
        """{"model", "replicas": {id: {...counts, "alive"}}, "num_replicas_alive"}."""
        now = time.monotonic()
        replicas = {}
        for rid, (at, snap) in self.replicas.items():
            replicas[rid] = {k: v for k, v in snap.items()
                             if not isinstance(v, dict) or k in ("request_success", "drained")}
            replicas[rid]["alive"] = now - at < STALE_S and snap.get("dead") is None
            replicas[rid]["num_running_ids"] = len(replicas[rid].pop("request_ids", []))
        return {"model": self.model_name, "replicas": replicas,
                "num_replicas_alive": sum(r["alive"] for r in replicas.values())}

    def dead_replicas(self) -> dict[str, str]:
        """Replicas whose engine died, as heard within STALE_S (Serve replaces them; then they go quiet)."""
        now = time.monotonic()
        return {rid: snap["dead"] for rid, (at, snap) in self.replicas.items()
                if now - at < STALE_S and snap.get("dead") is not None}

    def metrics_text(self) -> str:
        registry = CollectorRegistry()
        registry.register(_Collector(self.model_name, self.replicas))
        return generate_latest(registry).decode()
