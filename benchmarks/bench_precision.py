"""Precision and quantization: accuracy, memory and speed of fp32, bf16, int8, int4 and w8a8.

Bundled SmolLM2-135M, one rank in-process (`LLM`, local executor), 2 threads. Each precision
runs in its own child process (so peak RSS is its own), one after the other; ratios are to
fp32 measured in the same run.

- accuracy: perplexity of a fixed English text written into the repo
  (benchmarks/data/pride_and_prejudice_ch1.txt: the opening of Jane Austen's "Pride and
  Prejudice", chapter 1, public domain, 698 tokens), computed through Shardline itself with
  `SamplingParams(prompt_logprobs=0)` (vLLM's field, as lm-evaluation-harness uses it);
  greedy agreement with fp32: mean tokens before the first divergence over 32 prompts
  (16-token slices of the same text) x 64 greedy tokens (--quick: 8 x 32).
- memory: decoder linear-weight bytes, LM-head bytes beyond the tied embedding, peak RSS of the
  process; the memory floor of one decode step (bytes of every weight read per token / the
  read bandwidth measured in the same run).
- speed: batch-1 decode (ms per output token, 64 tokens), offline throughput (the throughput
  benchmark's seeded workload, --requests requests, prompts 8-128, outputs 8-64 tokens), and
  the kernel each quantized weight shape uses with its measured time ratio to the dense matmul.

    python benchmarks/bench_precision.py                 # all five precisions, 32 requests
    python benchmarks/bench_precision.py --only fp32 int8 --requests 8
    python benchmarks/bench_precision.py --quick --requests 16      # a loaded machine
    python benchmarks/bench_precision.py --quick --requests 16 --only fp32 w8a8 --interleaved 3

--interleaved R adds a speed table measured the other way: every listed precision loaded in
this one process and their decode and throughput runs interleaved (A B, B A, ...) for R rounds,
so load from other processes hits each alike; ratios are medians of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import resource
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# isort: off
from benchmarks import common  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads)
# isort: on

PRECISIONS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "int8": ("float32", "int8"),
              "int4": ("float32", "int4"), "int4-g64": ("float32", "int4-g64"), "w8a8": ("float32", "w8a8")}
TEXT = pathlib.Path(__file__).resolve().parent / "data" / "pride_and_prejudice_ch1.txt"
NUM_PROMPTS, PROMPT_LEN, GREEDY_TOKENS, DECODE_TOKENS = 32, 16, 64, 64
QUICK = (8, 32, 32)   # --quick: prompts x greedy tokens for agreement, decode tokens timed
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")


def cpu_flags() -> dict[str, bool]:
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {f: f in flags for f in CPU_FLAGS}


def text_logprobs(llm, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, through Shardline's own `prompt_logprobs` (vLLM's field)."""
    from cluster import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    return [d[t] for d, t in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]


def run_one(name: str, model: str, requests: int, quick: bool) -> dict:
    """Everything measured for one precision, in this process."""
    common.set_threads(2)
    from benchmarks.workload import make_requests
    from cluster import LLM, SamplingParams
    from sharding.quant.apply import weight_bytes

    dtype, quant = PRECISIONS[name]
    t0 = time.perf_counter()
    llm = LLM(model, dtype=dtype, quantization=quant, max_num_seqs=32, max_num_batched_tokens=2048,
              kv_cache_memory=256 * 2**20)
    load_s = time.perf_counter() - t0
    runner = llm.executor.runner
    report = runner.quant_report
    if report is None:
        linear, head = weight_bytes(runner.model)
        report = {"linear_weight_bytes": linear, "lm_head_bytes": head, "kernels": {}}
    embed = runner.model.tied_embedding()
    embed_bytes = embed.weight.numel() * embed.weight.element_size() if embed is not None else 0
    ids = llm.tokenizer.encode(TEXT.read_text()).ids
    lps = text_logprobs(llm, ids)
    num_prompts, greedy_tokens, decode_tokens = QUICK if quick else (NUM_PROMPTS, GREEDY_TOKENS, DECODE_TOKENS)
    greedy = SamplingParams(temperature=0, max_tokens=greedy_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": ids[i * 20:i * 20 + PROMPT_LEN]} for i in range(num_prompts)]
    agree = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, greedy, use_tqdm=False)]
    one = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    decode_s = min(common.timed(lambda: llm.generate([prompts[0]], one, use_tqdm=False)) for _ in range(2))
    reqs = make_requests(requests, vocab_size=49152, max_prompt=128, max_output=64)
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    thr_s = common.timed(lambda: llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs], params,
                                              use_tqdm=False))
    llm.shutdown()
    return {"name": name, "requests": requests, "dtype": dtype, "quantization": quant, "load_s": load_s,
            "perplexity": math.exp(-sum(lps) / len(lps)), "text_tokens": len(ids), "greedy_tokens": agree,
            "decode_ms_per_token": 1e3 * decode_s / decode_tokens, "quick": quick,
            "throughput_tok_s": sum(r.max_tokens for r in reqs) / thr_s,
            "linear_weight_bytes": report["linear_weight_bytes"], "lm_head_bytes": report["lm_head_bytes"],
            "embedding_bytes": embed_bytes, "kernels": report["kernels"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def agreement(tokens: list[list[int]], ref: list[list[int]]) -> float:
    """Mean number of tokens before the first divergence from the reference."""
    def prefix(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return sum(prefix(a, b) for a, b in zip(tokens, ref)) / len(ref)


def kernel_summary(kernels: dict) -> str:
    if not kernels:
        return "dense (F.linear)"
    return ", ".join(f"{shape}: {k['kernel']} ({k['ratio_to_dense'][0]:.2f}/{k['ratio_to_dense'][1]:.2f})"
                     for shape, k in kernels.items())


def report(results: list[dict], bandwidth_gbs: float, flags: dict) -> str:
    base = next(r for r in results if r["name"] == "fp32")
    rows, krows = [], []
    for r in results:
        read = r["linear_weight_bytes"] + r["lm_head_bytes"] + r["embedding_bytes"]   # bytes read per decode step
        rows.append([r["name"], f"{r['perplexity']:.3f}", f"{100 * (r['perplexity'] / base['perplexity'] - 1):+.2f} %",
                     f"{agreement(r['greedy_tokens'], base['greedy_tokens']):.1f} / {len(base['greedy_tokens'][0])}",
                     f"{r['linear_weight_bytes'] / 2**20:.1f}",
                     f"{base['linear_weight_bytes'] / r['linear_weight_bytes']:.2f}x",
                     f"{r['lm_head_bytes'] / 2**20:.1f}", f"{r['peak_rss_mb']:.0f}",
                     f"{r['decode_ms_per_token']:.1f}",
                     f"{base['decode_ms_per_token'] / r['decode_ms_per_token']:.2f}x",
                     f"{1e3 * read / (bandwidth_gbs * 1e9):.2f}",
                     f"{r['throughput_tok_s']:.1f}", f"{r['throughput_tok_s'] / base['throughput_tok_s']:.2f}x",
                     str(r["requests"])])
        for shape, k in r["kernels"].items():
            cands = ", ".join(f"{n} {v[0]:.3f}/{v[1]:.3f}" for n, v in k["ms"].items())
            rejected = "; ".join(f"{n}: {w}" for n, w in k["rejected"].items())
            krows.append([r["name"], shape, k["kernel"], cands, rejected])
    headers = ["precision", "perplexity", "vs fp32", "greedy agreement", "linear MiB", "smaller",
               "LM head extra MiB", "peak RSS MiB", "decode ms/token", "decode speed-up",
               "memory floor ms/token", "throughput tok/s", "throughput ratio", "throughput requests"]
    flag_text = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items())
    return "\n\n".join([
        "## Precision (bench_precision.py)", common.machine_line(), f"CPU features: {flag_text}; "
        f"read bandwidth {bandwidth_gbs:.1f} GB/s", common.markdown_table(headers, rows),
        "Kernel per weight shape (ms per call at batch 1 / batch B, measured at load on the rank's weights):",
        common.markdown_table(["precision", "shape", "chosen", "candidates ms (b1/bB)", "rejected"], krows)])


def interleaved_speed(names: list[str], model: str, requests: int, quick: bool, rounds: int) -> str:
    """Batch-1 decode and throughput of every precision, loaded side by side and timed in turn."""
    from benchmarks.workload import make_requests
    from cluster import LLM, SamplingParams

    decode_tokens = QUICK[2] if quick else DECODE_TOKENS
    llms = {n: LLM(model, dtype=PRECISIONS[n][0], quantization=PRECISIONS[n][1], max_num_seqs=32,
                   max_num_batched_tokens=2048, kv_cache_memory=256 * 2**20) for n in names}
    prompt = [{"prompt_token_ids": list(range(100, 100 + PROMPT_LEN))}]
    one = SamplingParams(temperature=0, max_tokens=decode_tokens, ignore_eos=True)
    reqs = make_requests(requests, vocab_size=49152, max_prompt=128, max_output=64)
    batch = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]
    for llm in llms.values():   # warm-up
        llm.generate(prompt, one, use_tqdm=False)
    decode = common.interleaved({n: lambda llm=llm: common.timed(lambda: llm.generate(prompt, one, use_tqdm=False))
                                 for n, llm in llms.items()}, rounds)
    thr = common.interleaved({n: lambda llm=llm: common.timed(lambda: llm.generate(batch, params, use_tqdm=False))
                              for n, llm in llms.items()}, rounds)
    for llm in llms.values():
        llm.shutdown()
    rows = []
    for n in names:
        d_ratio = [b / x for b, x in zip(decode["fp32"], decode[n])]
        t_ratio = [b / x for b, x in zip(thr["fp32"], thr[n])]
        rows.append([n, f"{1e3 * common.median(decode[n]) / decode_tokens:.1f}", f"{common.median(d_ratio):.2f}x",
                     " ".join(f"{r:.2f}" for r in d_ratio),
                     f"{sum(r.max_tokens for r in reqs) / common.median(thr[n]):.1f}", f"{common.median(t_ratio):.2f}x",
                     " ".join(f"{r:.2f}" for r in t_ratio)])
    return "\n\n".join([f"Interleaved in one process, {rounds} rounds, {requests} requests ({common.machine_line()}):",
                         common.markdown_table(["precision", "decode ms/token", "decode speed-up", "per round",
                                                "throughput tok/s", "throughput ratio", "per round"], rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--only", nargs="+", choices=list(PRECISIONS), default=list(PRECISIONS))
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--quick", action="store_true",
                    help=f"agreement over {QUICK[0]} prompts x {QUICK[1]} tokens, decode timed over {QUICK[2]} tokens")
    ap.add_argument("--one", choices=list(PRECISIONS), help=argparse.SUPPRESS)   # child mode
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/precision", help="writes OUT.json and OUT.md")
    ap.add_argument("--append-md", default=None, help="also append the table to this file (run_all.py)")
    ap.add_argument("--interleaved", type=int, default=0, metavar="R",
                    help="also time decode and throughput of all precisions in one process, R interleaved rounds")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse /tmp/bench_precision_NAME.json of an earlier run with the same --requests")
    args = ap.parse_args()
    model = common.model_path(args.model)
    if args.one:
        pathlib.Path(args.json_out).write_text(json.dumps(run_one(args.one, model, args.requests, args.quick)))
        return
    names = ["fp32"] + [n for n in args.only if n != "fp32"]
    results = []
    from tqdm.auto import tqdm
    for name in tqdm(names, desc="precisions"):
        out = pathlib.Path(f"/tmp/bench_precision_{name}.json")
        old = json.loads(out.read_text()) if args.reuse and out.is_file() else {}
        if (old.get("requests"), old.get("quick")) == (args.requests, args.quick):
            results.append(old)
            continue
        subprocess.run([sys.executable, __file__, "--one", name, "--json-out", str(out), "--model", model,
                        "--requests", str(args.requests)] + (["--quick"] if args.quick else []), check=True)
        results.append(json.loads(out.read_text()))
    common.set_threads(2)
    bandwidth = common.median([common.memory_bandwidth_gbs()() for _ in range(3)])
    text = report(results, bandwidth, cpu_flags())
    if args.interleaved:
        text += "\n\n" + interleaved_speed(names, model, args.requests, args.quick, args.interleaved)
    print(text)
    pathlib.Path(args.out + ".json").parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out + ".json").write_text(json.dumps({"machine": common.machine_line(), "cpu_flags": cpu_flags(),
                                                            "bandwidth_gbs": bandwidth, "results": results}, indent=1))
    pathlib.Path(args.out + ".md").write_text(text + "\n")
    common.write_result(args.append_md, text)


if __name__ == "__main__":
    main()
