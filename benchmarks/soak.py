"""Soak: the serving workload over HTTP for N minutes while one worker is killed every K seconds.

1. `shardline serve MODEL` (a local Ray, one engine at T x P, `--max-restarts` above the number
   of kills) until /health answers 200;
2. reference: the seeded workload (benchmarks/workload.py) once over HTTP, nothing killed;
3. soak: `--concurrency` streams cycle through the same workload for `--minutes`; every
   `--kill-every` seconds one `ShardWorker` (a different rank each time) is `ray.kill`ed;
4. every request is classed: completed (and its streamed text equal to the reference, so no token
   was lost or sent twice), errored (a clear HTTP or in-stream error) or lost (anything else: a
   stream cut without an error, a hang past `--request-timeout`). `lost` must be 0.

Per kill it reports the longest pause the clients saw in the stream of tokens (from the kill to
the next kill), and the engine's restart counter from /metrics.

    make soak                                        # 10 minutes, a kill every 2 minutes
    python benchmarks/soak.py --minutes 3            # shorter

Writes benchmarks/results/soak.json and soak.md (or --json / --output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import re
import secrets
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root, for `python benchmarks/...`

# isort: off
from benchmarks import common  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads)
# isort: on

from benchmarks import serve_process  # noqa: E402
from benchmarks.workload import Request, make_requests, summary  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder (default: the bundled SmolLM2)")
    ap.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    ap.add_argument("--kill-every", type=float, default=120.0, metavar="S", help="seconds between kills (default 120)")
    ap.add_argument("--num-requests", type=int, default=32, help="distinct requests in the workload (default 32)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[8, 64], metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=[8, 32], metavar=("MIN", "MAX"))
    ap.add_argument("--concurrency", type=int, default=8, help="streams in flight (default 8)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--cpus-per-worker", type=float, default=0.25)
    ap.add_argument("--standby-workers", action="store_true", help="serve with standby actors (faster rebuilds)")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="a request not done by then is lost")
    ap.add_argument("--json", default=str(RESULTS / "soak.json"))
    ap.add_argument("--output", default=str(RESULTS / "soak.md"))
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------- the server


def start_server(model: str, args, env: dict, port: int, max_restarts: int):
    """(process, Ray address) of the soaked `shardline serve`."""
    proc, _, address = serve_process.start(model, port, env, [
        "-tp", str(args.tp), "-pp", str(args.pp), "--cpus-per-worker", str(args.cpus_per_worker),
        "--max-restarts", str(max_restarts), "--max-ongoing-requests", "256", "--max-queued-requests", "256",
        "--name", "soak"] + (["--standby-workers"] if args.standby_workers else []))
    return proc, address


def restarts_from_metrics(url: str) -> int:
    import httpx
    text = httpx.get(f"{url}/metrics", timeout=30).text
    m = re.search(r"^shardline:replica_restarts(?:_total)?(?:\{[^}]*\})? (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else -1


# ------------------------------------------------------------------------------------- clients


class Clock:
    """When the clients last received a token (to measure the stall after a kill)."""

    def __init__(self) -> None:
        self.token_times: list[float] = []

    def tick(self) -> None:
        self.token_times.append(time.monotonic())


async def one_request(client, url: str, model: str, req: Request, clock: Clock, timeout: float) -> dict:
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    text, finish, error = [], None, None
    try:
        async with asyncio.timeout(timeout):
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return {"outcome": "errored", "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = chunk["error"].get("message", str(chunk["error"]))
                        continue
                    for c in chunk.get("choices", []):
                        text.append(c.get("text", ""))
                        finish = c.get("finish_reason") or finish
                        clock.tick()
    except TimeoutError:
        return {"outcome": "lost", "error": f"no end after {timeout:g} s"}
    except Exception as exc:   # noqa: BLE001 - a cut connection is a lost request, reported as such
        return {"outcome": "lost", "error": f"{type(exc).__name__}: {exc}"}
    if error is not None:
        return {"outcome": "errored", "error": error}
    if finish is None:
        return {"outcome": "lost", "error": "the stream ended without a finish_reason or an error"}
    return {"outcome": "completed", "text": "".join(text), "finish_reason": finish}


async def reference_run(url: str, model: str, reqs: list[Request], concurrency: int, timeout: float) -> list[str]:
    import httpx
    sem, clock = asyncio.Semaphore(concurrency), Clock()
    async with httpx.AsyncClient(timeout=None) as client:
        async def go(req):
            async with sem:
                return await one_request(client, url, model, req, clock, timeout)
        res = await asyncio.gather(*(go(r) for r in reqs))
    bad = [r for r in res if r["outcome"] != "completed"]
    if bad:
        raise RuntimeError(f"the undisturbed reference run failed: {bad[:3]}")
    return [r["text"] for r in res]


async def soak_run(url: str, model: str, reqs: list[Request], expected: list[str], args, clock: Clock,
                   end: float) -> list[dict]:
    import httpx
    results: list[dict] = []
    counter = iter(range(10**9))
    async with httpx.AsyncClient(timeout=None) as client:
        async def worker():
            while time.monotonic() < end:
                i = next(counter) % len(reqs)
                r = await one_request(client, url, model, reqs[i], clock, args.request_timeout)
                if r["outcome"] == "completed" and r["text"] != expected[i]:
                    r["outcome"] = "mismatch"
                r["index"] = i
                results.append(r)
                done = len(results)
                if done % 50 == 0:
                    print(f"  {done} requests, {time.monotonic() - end + args.minutes * 60:.0f} s", flush=True)
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return results


# ------------------------------------------------------------------------------------- the killer


def killer(address: str, args, stop: threading.Event, kills: list[dict], end: float) -> None:
    """Every --kill-every seconds until the soak's end, ray.kill one ShardWorker (rank k mod world size)."""
    import ray
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        k = 0
        while not stop.wait(args.kill_every) and time.monotonic() < end:
            named = sorted((a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
                           if re.search(r"^shardline-.*-rank\d+$", a["name"]))
            if not named:
                kills.append({"at": time.monotonic(), "error": "no ShardWorker found"})
                continue
            name, namespace = named[k % len(named)]
            try:
                ray.kill(ray.get_actor(name, namespace=namespace), no_restart=True)
                kills.append({"at": time.monotonic(), "worker": name})
                print(f"  killed {name}", flush=True)
            except Exception as exc:   # noqa: BLE001 - e.g. it is being rebuilt right now
                kills.append({"at": time.monotonic(), "error": f"{name}: {exc}"})
            k += 1
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = common.model_path(args.model)
    tmp = tempfile.mkdtemp(prefix="sk", dir="/tmp")
    token = pathlib.Path(tmp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    ray_vars = {"RAY_TMPDIR": tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | ray_vars | {"PYTHONPATH": str(REPO)}
    os.environ.update(ray_vars)   # the killer joins the server's Ray
    os.environ.pop("RAY_ADDRESS", None)
    from sharding.dist import free_port
    port = free_port("127.0.0.1")
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(model).vocab_size
    reqs = make_requests(args.num_requests, vocab, min_prompt=args.prompt_len[0], max_prompt=args.prompt_len[1],
                         min_output=args.output_len[0], max_output=args.output_len[1])
    planned_kills = int(args.minutes * 60 // args.kill_every)
    print(f"workload: {summary(reqs)}; {args.minutes:g} min, a kill every {args.kill_every:g} s "
          f"({planned_kills} kills); machine: {common.machine_line()}", flush=True)
    proc, address = start_server(model, args, env, port, max_restarts=planned_kills + 2)
    url, name = f"http://127.0.0.1:{port}", pathlib.Path(model).resolve().name
    kills: list[dict] = []
    stop = threading.Event()
    try:
        t0 = time.monotonic()
        expected = asyncio.run(reference_run(url, name, reqs, args.concurrency, args.request_timeout))
        print(f"reference run: {len(expected)} requests in {time.monotonic() - t0:.1f} s", flush=True)
        clock = Clock()
        t0 = time.monotonic()
        end = t0 + args.minutes * 60
        thread = threading.Thread(target=killer, args=(address, args, stop, kills, end), daemon=True)
        thread.start()
        results = asyncio.run(soak_run(url, name, reqs, expected, args, clock, end))
        elapsed = time.monotonic() - t0
        stop.set()
        thread.join(timeout=30)
        restarts = restarts_from_metrics(url)
    finally:
        stop.set()
        serve_process.stop(proc)
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("completed", "mismatch", "errored", "lost")}
    times = sorted(clock.token_times)
    for j, kill in enumerate(kills):   # the longest token gap the clients saw from this kill to the next
        upto = kills[j + 1]["at"] if j + 1 < len(kills) else float("inf")
        window = [kill["at"]] + [t for t in times if kill["at"] < t <= upto]
        kill["stall_s"] = max((b - a for a, b in zip(window, window[1:], strict=False)), default=None)
    result = {
        "machine": common.machine_line(), "model": model, "workload": summary(reqs),
        "layout": {"tp": args.tp, "pp": args.pp}, "standby_workers": args.standby_workers,
        "concurrency": args.concurrency, "minutes": args.minutes,
        "kill_every_s": args.kill_every, "elapsed_s": elapsed, "requests": len(results), **counts,
        "greedy_equal_to_reference": counts["mismatch"] == 0,
        "kills": [{k: v for k, v in kill.items() if k != "at"} for kill in kills], "engine_restarts": restarts,
        "errors": sorted({r["error"][:200] for r in results if "error" in r})[:10],
        "completed_tok_per_s": sum(reqs[r["index"]].max_tokens for r in results if r["outcome"] == "completed")
        / elapsed,
    }
    write(result, args)
    return result


def write(result: dict, args) -> None:
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2))
    rows = [[k, result[k]] for k in ("requests", "completed", "mismatch", "errored", "lost")]
    krows = [[i + 1, k.get("worker", k.get("error")), "-" if k["stall_s"] is None else f"{k['stall_s']:.1f}"]
             for i, k in enumerate(result["kills"])]
    text = "\n\n".join([
        "## Soak (benchmarks/soak.py)",
        f"{result['machine']}. Model {pathlib.Path(result['model']).name}, tp={result['layout']['tp']} "
        f"pp={result['layout']['pp']}, {result['concurrency']} concurrent HTTP streams for {result['minutes']:g} min, "
        f"one worker killed every {result['kill_every_s']:g} s; workload: {result['workload']}.",
        common.markdown_table(["requests", "count"], rows),
        common.markdown_table(["kill", "worker", "longest token gap s after the kill"], krows),
        f"Engine restarts (/metrics): {result['engine_restarts']}. Greedy outputs equal to the undisturbed "
        f"reference run: {result['greedy_equal_to_reference']}. Completed output tokens/s over the soak: "
        f"{result['completed_tok_per_s']:.1f}." + (f" Errors: {result['errors']}" if result["errors"] else ""),
    ])
    pathlib.Path(args.output).write_text(text + "\n")
    print(text)
    if result["lost"] or result["mismatch"]:
        sys.exit(f"soak FAILED: {result['lost']} lost, {result['mismatch']} differ from the reference")


if __name__ == "__main__":
    main()
