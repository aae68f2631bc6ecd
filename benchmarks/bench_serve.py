"""Serving: HTTP throughput and latency of `shardline serve` against offline `LLM.generate`, same run.

1. start-up: `shardline serve MODEL` (a local Ray, one engine) from process spawn to the first
   200 from /health;
2. saturation: the throughput benchmark's seeded workload (benchmarks/workload.py) sent over
   HTTP with 64 concurrent streams (/v1/completions, token-id prompts, outputs forced to their
   length), against the same workload through offline `LLM.generate` - an `LLM` with the same
   layout joined to the same Ray cluster, so both sides run the same Ray executor and the ratio
   is what serving costs. Rounds alternate (offline, HTTP, HTTP, offline, ...);
3. latency: TTFT and TPOT p50/p99 at 1 and 8 concurrent streams (--stream-levels), and TTFT at
   1 stream against the offline first-token time (`LLM.generate_stream`, the same prompts one at
   a time);
4. Poisson arrivals (what `vllm bench serve` reports): --rate-requests requests sent at each of
   --rates requests/s (exponential gaps from a seeded generator; `inf` sends them all at once,
   saturation), streamed through /v1/completions; per rate: TTFT, TPOT and inter-token latency
   (mean, p50, p99), requests/s, output tokens/s, failed requests. A failure (an HTTP error, a
   dropped stream, a short output) is counted, never raised.

    python benchmarks/bench_serve.py            # 128 requests, prompts 8-128, outputs 8-64
    python benchmarks/bench_serve.py --quick    # 32 requests, prompts 8-64, outputs 8-32 (a few minutes)
    python benchmarks/bench_serve.py --rates 0.5 1 2 4 inf --rate-requests 32

Writes benchmarks/results/serve.json and serve.md (or --json / --output).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import secrets
import sys
import tempfile
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
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[8, 128], metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, nargs=2, default=[8, 64], metavar=("MIN", "MAX"))
    ap.add_argument("--concurrency", type=int, default=64, help="streams at saturation (default 64)")
    ap.add_argument("--latency-requests", type=int, default=16, help="requests per latency level (default 16)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per side at saturation (default 2)")
    ap.add_argument("--stream-levels", type=int, nargs="*", default=[1, 8],
                    help="concurrent streams of the fixed-concurrency latency runs (default: 1 8)")
    ap.add_argument("--rates", type=float, nargs="*", default=[0.5, 1.0, 2.0, float("inf")],
                    help="Poisson arrival rates in requests/s; inf = all at once (default: 0.5 1 2 inf)")
    ap.add_argument("--rate-requests", type=int, default=16, help="requests per Poisson rate (default 16)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--cpus-per-worker", type=float, default=0.5,
                    help="both engines share the cluster, each worker reserves this (default 0.5)")
    ap.add_argument("--quick", action="store_true", help="32 requests, prompts 8-64, outputs 8-32, 8 latency requests")
    ap.add_argument("--json", default=str(RESULTS / "serve.json"))
    ap.add_argument("--output", default=str(RESULTS / "serve.md"))
    args = ap.parse_args(argv)
    if args.quick:
        args.num_requests, args.prompt_len, args.output_len, args.latency_requests = 32, [8, 64], [8, 32], 8
        args.rounds, args.stream_levels, args.rate_requests = 1, [1], 8
    for r in args.rates:
        if not r > 0:
            ap.error(f"--rates: {r:g} is not a rate; give requests per second > 0, or inf for all at once")
    return args


# ------------------------------------------------------------------------------------- the server


def start_server(model: str, args, env: dict, port: int):
    return serve_process.start(model, port, env, [
        "--tensor-parallel-size", str(args.tp), "--pipeline-parallel-size", str(args.pp),
        "--max-num-seqs", str(args.max_num_seqs), "--cpus-per-worker", str(args.cpus_per_worker),
        "--max-ongoing-requests", "256", "--max-queued-requests", "256", "--name", "bench"])


# ------------------------------------------------------------------------------------- HTTP client


async def stream_completion(client, url: str, model: str, req: Request) -> tuple[list[float], int]:
    """One streamed /v1/completions request: (arrival time of each text chunk, completion tokens in the usage
    chunk). A non-200 answer raises RuntimeError with its status and the start of its body."""
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    chunks, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"]:
                chunks.append(time.perf_counter())
    return chunks, tokens


async def one_stream(client, url: str, model: str, req: Request) -> dict:
    t0 = time.perf_counter()
    chunks, tokens = await stream_completion(client, url, model, req)
    return {"ttft": chunks[0] - t0, "tpot": (chunks[-1] - chunks[0]) / max(tokens - 1, 1), "tokens": tokens}


async def http_run(url: str, model: str, reqs: list[Request], concurrency: int) -> tuple[float, list[dict]]:
    import httpx
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        async def go(req):
            async with sem:
                return await one_stream(client, url, model, req)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(go(r) for r in reqs))
        return time.perf_counter() - t0, results


# ------------------------------------------------------------------------------------- offline


def offline_run(llm, reqs: list[Request]) -> float:
    from cluster import SamplingParams
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    assert [len(o.outputs[0].token_ids) for o in outs] == [r.max_tokens for r in reqs]
    return elapsed


def offline_first_token(llm, reqs: list[Request]) -> list[float]:
    from cluster import SamplingParams
    out = []
    for r in reqs:
        t0 = time.perf_counter()
        stream = llm.generate_stream({"prompt_token_ids": r.prompt_token_ids},
                                     SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True))
        next(stream)
        out.append(time.perf_counter() - t0)
        for _ in stream:   # finish it, so the next request runs alone
            pass
    return out


# ------------------------------------------------------------------------------------- Poisson arrivals


def arrival_times(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (s from the start) of `n` requests arriving as a Poisson process of `rate` per second.

    Gaps are exponential with mean 1/rate from `random.Random(seed)` (the same seed, the same
    schedule); rate=inf sends every request at 0.
    """
    import math
    import random
    if math.isinf(rate):
        return [0.0] * n
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


async def timed_stream(client, url: str, model: str, req: Request, send_at: float, t0: float) -> dict:
    """One streamed request sent at t0 + send_at: its chunk arrival times, or the error that ended it."""
    await asyncio.sleep(max(0.0, t0 + send_at - time.perf_counter()))
    start = time.perf_counter()
    try:
        chunks, tokens = await stream_completion(client, url, model, req)
    except Exception as e:   # an HTTP error or a dropped connection is a failed request, not a crashed benchmark
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    if tokens != req.max_tokens or not chunks:
        return {"ok": False, "error": f"{tokens} of {req.max_tokens} tokens"}
    return {"ok": True, "start": start, "chunks": chunks, "tokens": tokens}


def serving_metrics(records: list[dict], elapsed: float) -> dict:
    """The `vllm bench serve` figures of one run: throughput, failures, TTFT / TPOT / ITL mean, p50, p99 (s).

    TTFT: send to first chunk; TPOT: (last chunk - first chunk) / (tokens - 1) per request;
    ITL: every gap between consecutive chunks of a request, pooled over requests.
    """
    ok = [r for r in records if r["ok"]]
    ttft = [r["chunks"][0] - r["start"] for r in ok]
    tpot = [(r["chunks"][-1] - r["chunks"][0]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    itl = [b - a for r in ok for a, b in zip(r["chunks"], r["chunks"][1:])]
    return {"completed": len(ok), "failed": len(records) - len(ok), "duration_s": elapsed,
            "request_throughput": len(ok) / elapsed, "output_throughput": sum(r["tokens"] for r in ok) / elapsed,
            "ttft": common.percentiles(ttft), "tpot": common.percentiles(tpot), "itl": common.percentiles(itl),
            "errors": sorted({r["error"] for r in records if not r["ok"]})[:5]}


async def poisson_run(url: str, model: str, reqs: list[Request], rate: float, seed: int = 0) -> dict:
    """Send `reqs` at Poisson arrivals of `rate` per second (no concurrency cap, as `vllm bench serve`)."""
    import httpx
    times = arrival_times(len(reqs), rate, seed)
    limits = httpx.Limits(max_connections=len(reqs) + 4, max_keepalive_connections=len(reqs) + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        t0 = time.perf_counter()
        records = await asyncio.gather(*(timed_stream(client, url, model, r, at, t0) for r, at in zip(reqs, times)))
        elapsed = time.perf_counter() - t0
    import math
    return {"rate": rate if math.isfinite(rate) else "inf", **serving_metrics(records, elapsed)}


def _percentiles(res: list[dict]) -> dict:
    return {f"{k}_p{q}": pct([r[k] for r in res], q) for k in ("ttft", "tpot") for q in (50, 99)}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


# ------------------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    model = common.model_path(args.model)
    tmp = tempfile.mkdtemp(prefix="bs", dir="/tmp")
    token = pathlib.Path(tmp) / "auth_token"
    token.write_text(secrets.token_hex(32))
    ray_vars = {"RAY_TMPDIR": tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | ray_vars | {"PYTHONPATH": str(REPO)}
    os.environ.update(ray_vars)   # this process joins the server's Ray for the offline side
    os.environ.pop("RAY_ADDRESS", None)
    from sharding.dist import free_port
    port = free_port("127.0.0.1")
    from transformers import AutoConfig
    vocab = AutoConfig.from_pretrained(model).vocab_size
    reqs = make_requests(args.num_requests, vocab, min_prompt=args.prompt_len[0], max_prompt=args.prompt_len[1],
                         min_output=args.output_len[0], max_output=args.output_len[1])
    lat_reqs = make_requests(args.latency_requests, vocab, seed=1, min_prompt=args.prompt_len[0],
                             max_prompt=args.prompt_len[1], min_output=args.output_len[0],
                             max_output=args.output_len[1])
    rate_reqs = make_requests(args.rate_requests, vocab, seed=2, min_prompt=args.prompt_len[0],
                              max_prompt=args.prompt_len[1], min_output=args.output_len[0],
                              max_output=args.output_len[1])
    print(f"workload: {summary(reqs)}; machine: {common.machine_line()}", flush=True)
    proc, startup, address = start_server(model, args, env, port)
    print(f"shardline serve healthy after {startup:.1f} s", flush=True)
    url, name = f"http://127.0.0.1:{port}", pathlib.Path(model).resolve().name
    try:
        from cluster import LLM
        llm = LLM(model, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp, address=address,
                  max_num_seqs=args.max_num_seqs, cpus_per_worker=args.cpus_per_worker)
        try:
            asyncio.run(http_run(url, name, reqs[:4], 4))   # warm both paths once
            offline_run(llm, reqs[:4])
            total = sum(r.max_tokens for r in reqs)
            times = {"offline": [], "http": []}
            for rnd in range(args.rounds):
                order = ["offline", "http"] if rnd % 2 == 0 else ["http", "offline"]
                for side in order:
                    if side == "offline":
                        times["offline"].append(offline_run(llm, reqs))
                    else:
                        elapsed, res = asyncio.run(http_run(url, name, reqs, args.concurrency))
                        assert [r["tokens"] for r in res] == [r.max_tokens for r in reqs]
                        times["http"].append(elapsed)
                    print(f"round {rnd} {side}: {total / times[side][-1]:.1f} output tok/s", flush=True)
            latency = {}
            for c in args.stream_levels:
                _, res = asyncio.run(http_run(url, name, lat_reqs, c))
                latency[c] = res
            offline_ttft = offline_first_token(llm, lat_reqs) if 1 in args.stream_levels else []
            poisson = []
            for rate in args.rates:
                poisson.append(asyncio.run(poisson_run(url, name, rate_reqs, rate)))
                print(f"rate {rate:g} req/s: {poisson[-1]['output_throughput']:.1f} output tok/s, "
                      f"{poisson[-1]['failed']} failed", flush=True)
        finally:
            llm.shutdown()
    finally:
        serve_process.stop(proc)
    tput = {side: total * len(ts) / sum(ts) for side, ts in times.items()}
    result = {
        "machine": common.machine_line(), "model": model, "workload": summary(reqs),
        "layout": {"tp": args.tp, "pp": args.pp}, "concurrency": args.concurrency,
        "startup_to_health_s": startup,
        "throughput_tok_s": tput, "http_over_offline": tput["http"] / tput["offline"],
        "latency": {str(c): _percentiles(res) for c, res in latency.items()},
        "offline_first_token_p50": pct(offline_ttft, 50) if offline_ttft else None,
        "poisson_workload": summary(rate_reqs), "poisson": poisson,
    }
    if offline_ttft:
        result["ttft_1_over_offline"] = result["latency"]["1"]["ttft_p50"] / result["offline_first_token_p50"]
    write(result, args)
    return result


POISSON_HEADERS = ["rate req/s", "completed", "failed", "req/s", "output tok/s"] + [
    f"{m} {s} ms" for m in ("TTFT", "TPOT", "ITL") for s in ("mean", "p50", "p99")]


def poisson_rows(poisson: list[dict]) -> list[list]:
    ms = lambda v: "n/a" if v is None else 1e3 * v
    return [[str(p["rate"]), p["completed"], p["failed"], p["request_throughput"], p["output_throughput"],
             *(ms(p[m][s]) for m in ("ttft", "tpot", "itl") for s in ("mean", "p50", "p99"))] for p in poisson]


def write(result: dict, args) -> None:
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    lat = result["latency"]
    rows = [["offline LLM.generate (same Ray executor)", f"{result['throughput_tok_s']['offline']:.1f}", "1.00"],
            [f"HTTP, {result['concurrency']} streams", f"{result['throughput_tok_s']['http']:.1f}",
             f"{result['http_over_offline']:.2f}"]]
    lrows = [[f"{c} stream(s)", f"{v['ttft_p50'] * 1e3:.0f}", f"{v['ttft_p99'] * 1e3:.0f}",
              f"{v['tpot_p50'] * 1e3:.1f}", f"{v['tpot_p99'] * 1e3:.1f}"] for c, v in lat.items()]
    text = "\n\n".join([
        "## Serving (benchmarks/bench_serve.py)",
        f"{result['machine']}. Model {pathlib.Path(result['model']).name}, tp={result['layout']['tp']} "
        f"pp={result['layout']['pp']}; workload: {result['workload']}.",
        common.markdown_table(["side", "output tokens/s", "ratio to offline"], rows),
        common.markdown_table(["HTTP load", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms", "TPOT p99 ms"], lrows),
        (f"TTFT at 1 stream (p50) {lat['1']['ttft_p50'] * 1e3:.0f} ms vs offline first token "
         f"{result['offline_first_token_p50'] * 1e3:.0f} ms (ratio {result['ttft_1_over_offline']:.2f}). "
         if "ttft_1_over_offline" in result else "") +
        f"`shardline serve` start-up to first healthy /health: {result['startup_to_health_s']:.1f} s.",
        f"### Poisson arrivals ({result['poisson_workload']}; inf = all at once)",
        common.markdown_table(POISSON_HEADERS, poisson_rows(result["poisson"])),
    ])
    pathlib.Path(args.output).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
