"""`shardline serve | status | stop`: run a Shardline Serve application, look at it, stop it.

    shardline serve [MODEL] --tensor-parallel-size T --pipeline-parallel-size P --data-parallel-size D
                    --name NAME --host 127.0.0.1 --port 8000 [--api-key K] [--detach]
    shardline status [--address A]
    shardline stop NAME [--address A]

`serve` in the foreground runs until Ctrl-C or SIGTERM, then drains (new requests get 503 +
Retry-After, running ones get --drain-timeout seconds, the rest end with finish_reason "abort"),
then deletes its application (Serve
removes the replicas, their placement groups and, with them, the workers) and, if it started a
local Ray, stops it. `--detach` deploys onto a running cluster (`ray start --head`; RAY_ADDRESS
or --address) and returns; `shardline stop NAME` removes it. Handlers follow cluster/cli.py's
convention: `_add_<name>(subparsers)` declares, `_run_<name>(args) -> int` runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

EXIT_OK = 0
HEALTH_WAIT_S = 600.0
DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
DRAIN_MARGIN_S = 15.0   # beyond --drain-timeout: replicas hear of the drain and abort the rest


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over OpenAI-compatible HTTP and the Python handle (Ray Serve)",
        description="Deploy MODEL as a Ray Serve application: one Shardline engine (T x P workers) per replica, "
        "D replicas, an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, "
        "/health, /metrics) and the Python handle `cluster.connect(NAME)`. Joins RAY_ADDRESS / --address, "
        "else starts a local Ray. Runs until Ctrl-C / SIGTERM unless --detach.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="Hugging Face model folder (default: the bundled SmolLM2-135M-Instruct, prepared on demand)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="T",
                   help="ranks per stage (default 1)")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, metavar="P",
                   help="pipeline stages (default 1)")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="D",
                   help="engine replicas, routed by Serve (default 1)")
    p.add_argument("--name", default="shardline",
                   help="application name, for connect(NAME) and stop (default shardline)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name clients send (default: the model folder's name)")
    p.add_argument("--host", default=None,
                   help="HTTP bind address (default 127.0.0.1: this machine only; on a cluster where Serve already "
                        "runs, its proxy's)")
    p.add_argument("--port", type=int, default=None,
                   help="HTTP port (default 8000; on a cluster where Serve already runs, its proxy's)")
    p.add_argument("--api-key", default=os.environ.get("SHARDLINE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $SHARDLINE_API_KEY, else none)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--detach", action="store_true",
                   help="deploy and return, leaving the application on the running cluster (needs RAY_ADDRESS or "
                   "--address); stop it with `shardline stop NAME`")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: the model's, "
                   "at most 4096)")
    p.add_argument("--max-num-seqs", type=int, default=128, help="most sequences per engine step (default 128)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default float32)")
    p.add_argument("--max-ongoing-requests", type=int, default=256,
                   help="requests served at once per ingress / engine replica (default 256)")
    p.add_argument("--max-queued-requests", type=int, default=64,
                   help="requests queued beyond that before HTTP answers 503 (default 64)")
    p.add_argument("--max-waiting-requests", type=int, default=128, metavar="N",
                   help="requests each engine lets wait beyond its running batch; past it HTTP answers 429 with "
                   "Retry-After (default 128)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM / Ctrl-C / stop: seconds running requests get to finish while new ones get 503; "
                   "the rest end with finish_reason \"abort\" (default 30; 0 aborts at once)")
    p.add_argument("--max-request-bytes", type=int, default=2 * 1024 * 1024, metavar="B",
                   help="largest HTTP request body; larger ones get 413 (default 2 MiB)")
    p.add_argument("--max-prompt-chars", type=int, default=256 * 1024, metavar="C",
                   help="longest text prompt (or chat) in characters (default 262144)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs each worker reserves (default: the cluster's CPUs shared by all workers, at most 1)")
    p.add_argument("--quantization", default=None, metavar="M",
                   help="int8, int4[-g32|-g64|-g128] or w8a8: each rank quantizes its own slices (README: Precision)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each rank's decode steps (needs a C++ compiler on CPU; README: Performance)")
    p.add_argument("--max-restarts", type=int, default=3, metavar="N",
                   help="rebuilds of an engine replica's workers after one died or hung, requests recomputed "
                   "(default 3; 0: fail-stop, Serve then replaces the replica)")
    p.add_argument("--standby-workers", action="store_true",
                   help="keep a started, idle actor per rank that a rebuild takes over: recovery in seconds "
                   "for an idle process per rank (CPU only so far)")
    p.add_argument("--skip-preflight", action="store_true",
                   help="on a multi-node cluster, do not check every node first (`shardline preflight`)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from cluster.model_prep import prepare_model
    from cluster.serve.config import ServeConfig

    if args.detach and not (args.address or os.environ.get("RAY_ADDRESS")):
        raise ValueError("--detach needs a running cluster to leave the application on: `ray start --head`, "
                         "then set RAY_ADDRESS or pass --address")
    engine_kwargs = {"max_num_seqs": args.max_num_seqs, "dtype": args.dtype,
                     "max_waiting_requests": args.max_waiting_requests, "max_restarts": args.max_restarts}
    if args.quantization is not None:
        engine_kwargs["quantization"] = args.quantization
    for flag in ("compile", "standby_workers"):
        if getattr(args, flag):
            engine_kwargs[flag] = True
    if args.max_model_len is not None:
        engine_kwargs["max_model_len"] = args.max_model_len
    config = ServeConfig(
        model=str(args.model or prepare_model()), served_model_name=args.served_model_name,
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size, api_key=args.api_key,
        max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
        drain_timeout_s=args.drain_timeout, max_request_bytes=args.max_request_bytes,
        max_prompt_chars=args.max_prompt_chars, cpus_per_worker=args.cpus_per_worker, engine_kwargs=engine_kwargs)
    started_ray = _join(args.address)
    try:
        if not args.skip_preflight:
            _preflight_if_multinode(config, args)
    except BaseException:
        if started_ray:
            import ray

            ray.shutdown()
        raise
    try:
        _deploy(config, args)
        if args.detach:
            print(f"detached: stop it with `shardline stop {args.name}`", flush=True)
            return EXIT_OK
        _wait_for_signal()
        _drain(args.name, args.drain_timeout)
        return EXIT_OK
    finally:
        if not args.detach:
            _shutdown(args.name, started_ray)


def _join(address: str | None) -> bool:
    import ray

    from cluster.ray_connect import connect

    started = connect(address)
    print(f"ray cluster: {ray.get_runtime_context().gcs_address}", flush=True)
    return started


def _preflight_if_multinode(config, args: argparse.Namespace) -> None:
    """On a cluster of several nodes, check each one the layout uses before deploying anything."""
    from cluster.preflight import check_if_multinode

    result = check_if_multinode(config.model, config.tensor_parallel_size, config.pipeline_parallel_size,
                                skip_hint="`shardline serve --skip-preflight`", cpus_per_worker=args.cpus_per_worker)
    if result is not None:
        print(f"pre-flight passed on {len(result.rows)} node(s) in {result.seconds:.1f} s", flush=True)


def _deploy(config, args: argparse.Namespace) -> None:
    from ray import serve

    from cluster.serve.builder import build_app

    t0 = time.perf_counter()
    host, port = _serve_http(args.host, args.port)
    serve.run(build_app(config, args.name), name=args.name, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    _wait_healthy(url)
    print(f"serving {config.model_name!r} as application {args.name!r} at {url}/v1 "
          f"(tp={config.tensor_parallel_size} pp={config.pipeline_parallel_size} dp={config.data_parallel_size}; "
          f"healthy after {time.perf_counter() - t0:.1f} s)", flush=True)


def _serve_http(host: str | None, port: int | None) -> tuple[str, int]:
    """Start Serve's HTTP proxy, or join the one already running on the cluster -> its (host, port).

    Serve keeps one proxy per cluster, shared by every application, and silently ignores new
    http_options once it runs; so asking for another host or port than the running proxy's is an
    error here (naming the one to use) instead of a deployment nobody can reach."""
    from ray import serve
    from ray.serve.context import _get_global_client  # the running controller's HTTP options
    from ray.serve.exceptions import RayServeException

    try:
        running = _get_global_client().http_config
    except RayServeException:   # no Serve on this cluster yet
        running = None
    host, port = http_target(host, port, None if running is None else (running.host, running.port))
    serve.start(http_options={"host": host, "port": port})   # ignored (and equal) when the proxy runs
    return host, port


def http_target(host: str | None, port: int | None, running: tuple[str, int] | None) -> tuple[str, int]:
    """Where this application will answer: the asked host and port (defaults 127.0.0.1:8000), or the
    running proxy's; ValueError naming the proxy's when the asked ones differ from it.

    >>> http_target(None, None, None)
    ('127.0.0.1', 8000)
    >>> http_target(None, None, ("0.0.0.0", 9000))
    ('0.0.0.0', 9000)
    """
    if running is None:
        return host or DEFAULT_HOST, DEFAULT_PORT if port is None else port
    for flag, asked, actual in (("--port", port, running[1]), ("--host", host, running[0])):
        if asked is not None and asked != actual:
            raise ValueError(f"{flag} {asked}: Ray Serve already runs on this cluster with its HTTP proxy at "
                             f"{running[0]}:{running[1]}, shared by every application; pass {flag} {actual} "
                             f"or leave {flag} out")
    return running


def _wait_healthy(url: str) -> None:
    import httpx

    deadline = time.monotonic() + HEALTH_WAIT_S
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url}/health did not answer 200 within {HEALTH_WAIT_S:g} s")
        time.sleep(0.5)


def _wait_for_signal() -> None:
    """Block until Ctrl-C or SIGTERM (turned into KeyboardInterrupt so `finally` cleans up)."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)   # a background job inherits SIGINT ignored
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr, flush=True)


def _drain(name: str, timeout_s: float) -> None:
    """Graceful shutdown: every replica refuses new requests and finishes (or, past timeout_s, aborts) the rest."""
    from cluster.serve.client import ShardlineHandle

    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not cut the drain short
    print(f"draining {name} (up to {timeout_s:g} s)", file=sys.stderr, flush=True)
    handle = ShardlineHandle(name)
    try:
        handle._hub.drain.remote(timeout_s).result(timeout_s=30)
        deadline = time.monotonic() + timeout_s + DRAIN_MARGIN_S
        while time.monotonic() < deadline:
            live = [r for r in handle.stats()["replicas"].values() if r["alive"]]
            if all(r.get("drained") for r in live):
                totals = {k: sum(r["drained"][k] for r in live) for k in ("finished", "aborted")}
                print(f"drained {name}: {totals['finished']} finished, {totals['aborted']} aborted",
                      file=sys.stderr, flush=True)
                return
            time.sleep(0.25)
        print(f"drain of {name} did not complete in {timeout_s + DRAIN_MARGIN_S:g} s; stopping anyway",
              file=sys.stderr, flush=True)
    except Exception as exc:   # noqa: BLE001 - a failed drain must not prevent the clean-up
        print(f"drain of {name} failed ({type(exc).__name__}: {exc}); stopping anyway", file=sys.stderr, flush=True)


def _shutdown(name: str, started_ray: bool) -> None:
    import ray
    from ray import serve

    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # a second SIGTERM must not cut the clean-up short
    try:
        if name in serve.status().applications:
            serve.delete(name)
        if started_ray:
            serve.shutdown()
    finally:
        if started_ray:
            ray.shutdown()
    print(f"stopped {name}", file=sys.stderr, flush=True)


def add_status(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status", help="list the Serve applications on the cluster and each Shardline replica's counts",
        description="Print every Serve application (status, deployments, replicas) and, for Shardline "
        "applications, per-replica request, token, running/waiting and KV-cache figures.")
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else the local `ray start` one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    import json

    from ray import serve

    from cluster.serve.client import ShardlineHandle
    from cluster.serve.config import HUB_DEPLOYMENT

    _join_existing(args.address)
    report = {}
    for name, app in serve.status().applications.items():
        entry = {"status": str(app.status.value if hasattr(app.status, "value") else app.status),
                 "deployments": {d: {"status": str(getattr(s.status, "value", s.status)),
                                     "replicas": {str(getattr(k, "value", k)): v for k, v in s.replica_states.items()}}
                                 for d, s in app.deployments.items()}}
        if HUB_DEPLOYMENT in app.deployments:
            entry["stats"] = ShardlineHandle(name).stats()
        report[name] = entry
    if args.json:
        print(json.dumps(report, default=str))
        return EXIT_OK
    if not report:
        print("no Serve applications")
    for name, entry in report.items():
        print(f"{name}: {entry['status']}")
        for d, s in entry["deployments"].items():
            print(f"  {d}: {s['status']} {s['replicas']}")
        for rid, r in entry.get("stats", {}).get("replicas", {}).items():
            print(f"  replica {rid}: alive={r['alive']} requests={r['num_requests']} "
                  f"running={r['num_requests_running']} "
                  f"waiting={r['num_requests_waiting']} kv={r['kv_cache_usage_perc']:.1%} "
                  f"prompt_tokens={r['prompt_tokens']} generation_tokens={r['generation_tokens']}")
    return EXIT_OK


def add_stop(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "stop", help="delete a Serve application, releasing its actors and placement groups",
        description="Delete the application NAME (waits until Serve has removed its replicas, their placement "
        "groups and workers).")
    p.add_argument("name", metavar="NAME", help="the application name given to `shardline serve --name`")
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS, else the local `ray start` one)")
    p.set_defaults(func=run_stop)


def run_stop(args: argparse.Namespace) -> int:
    from ray import serve

    _join_existing(args.address)
    apps = serve.status().applications
    if args.name not in apps:
        raise LookupError(f"no application named {args.name!r} (running: {sorted(apps) or 'none'})")
    serve.delete(args.name)
    print(f"stopped {args.name}")
    return EXIT_OK


def _join_existing(address: str | None) -> None:
    """status / stop look at a running cluster; they never start one."""
    from cluster.ray_connect import connect

    connect(address or os.environ.get("RAY_ADDRESS") or "auto")


SUBCOMMANDS = [add_serve, add_status, add_stop]
