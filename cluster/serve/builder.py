"""`build_app`: the one function that turns a `ServeConfig` into a Serve application.

    OpenAIIngress (FastAPI)  --handle, stream=True-->  ShardlineEngine x D  --push-->  MetricsHub
                                                        (each: T x P ShardWorkers in its own group)

Each engine replica's placement group is its own small bundle plus one bundle per worker:

    >>> engine_bundles(tp=2, pp=1, cpus_per_worker=0.5, use_gpu=False)
    ([{'CPU': 0.01}, {'CPU': 0.5}, {'CPU': 0.5}], 'STRICT_PACK')
    >>> engine_bundles(tp=1, pp=2, cpus_per_worker=0.5, use_gpu=False)[1]   # stages may spread
    'PACK'

With P = 1 the whole group (one TP group) must share a node; with P > 1 Ray packs it where it
can and may spread stages over nodes (as `ray.serve.llm` places vLLM's workers).
"""

from __future__ import annotations

import ray
from ray import serve
from ray.serve.config import BackpressureConfig

from cluster.placement import default_cpu_share, worker_bundle
from cluster.ray_connect import worker_runtime_env
from cluster.serve.config import DEFAULT_APP_NAME, ENGINE_DEPLOYMENT, ServeConfig
from cluster.serve.engine_deployment import ShardlineEngine
from cluster.serve.errors import BACKPRESSURE_RETRY_S
from cluster.serve.metrics_hub import MetricsHub
from cluster.serve.openai_ingress import OpenAIIngress

REPLICA_CPU = 0.01     # the engine replica only schedules; its workers hold the CPUs
INGRESS_DRAIN_MARGIN_S = 5.0


def engine_bundles(tp: int, pp: int, cpus_per_worker: float, use_gpu: bool) -> tuple[list[dict], str]:
    """(bundles, strategy) of one engine replica's placement group: bundle 0 is the replica."""
    return ([{"CPU": REPLICA_CPU}] + [worker_bundle(use_gpu, cpus_per_worker) for _ in range(tp * pp)],
            "STRICT_PACK" if pp == 1 else "PACK")


def build_app(config: ServeConfig, app_name: str = DEFAULT_APP_NAME) -> serve.Application:
    """The Serve application for `config` (Ray must be initialized: worker shares read the cluster)."""
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    share = config.cpus_per_worker or _default_share(config)
    bundles, strategy = engine_bundles(config.tensor_parallel_size, config.pipeline_parallel_size, share, use_gpu)
    env = worker_runtime_env()
    # past both limits Serve itself answers 503 (its proxy, or a BackPressureError through the handle),
    # with a Retry-After header
    limits = {"max_ongoing_requests": config.max_ongoing_requests,
              "max_queued_requests": config.max_queued_requests,
              "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=BACKPRESSURE_RETRY_S)}
    # Serve waits this long for ongoing calls before it stops a replica (an engine's __del__ then aborts
    # the rest); the ingress waits a little longer, to deliver the engines' last (e.g. "abort") chunks
    drain = config.drain_timeout_s
    engine = ShardlineEngine.options(
        name=ENGINE_DEPLOYMENT, num_replicas=config.data_parallel_size, placement_group_bundles=bundles,
        placement_group_strategy=strategy, ray_actor_options={"num_cpus": REPLICA_CPU, "runtime_env": env},
        graceful_shutdown_timeout_s=drain, **limits).bind(config, app_name, share)
    hub = MetricsHub.options(ray_actor_options={"num_cpus": 0, "runtime_env": env}).bind(config.model_name)
    return OpenAIIngress.options(ray_actor_options={"num_cpus": 0, "runtime_env": env},
                                 graceful_shutdown_timeout_s=drain + INGRESS_DRAIN_MARGIN_S, **limits).bind(
        engine, hub, config)


def _default_share(config: ServeConfig) -> float:
    """Every worker of every replica gets an equal share of the cluster's CPUs, at most one."""
    workers = config.num_workers * config.data_parallel_size
    free = float(ray.cluster_resources().get("CPU", 0.0)) - REPLICA_CPU * config.data_parallel_size
    largest = max((float(n["Resources"].get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")), default=None)
    return default_cpu_share(workers, config.tensor_parallel_size, free, largest)
