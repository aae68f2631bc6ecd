"""Single-rank decode step time: Shardline's ModelRunner against HF transformers, same run.

For each batch size B: B random prompts of --prompt-len tokens are prefilled (untimed) into
Shardline's paged KV cache and into an HF `DynamicCache`; then repetitions of --steps greedy
decode steps (one token per sequence per step) are timed, Shardline and HF interleaved, with a
read-bandwidth probe and a matmul-rate probe in the same rotation. Both sides continue from where their previous
repetition stopped, so repetition k of either side runs at the same context length.

The memory floor is the time to read every weight once (bytes of unique parameters, the tied
embedding counted once as the LM head) at the bandwidth measured in this run: no
implementation that reads the weights from memory every step can beat it. The compute floor
is the step's matmul FLOPs at the matmul rate measured in this run (it binds at large batches).

    python benchmarks/bench_decode.py                 # batches 1 and 64, ~5 minutes on 2 shared cores
    python benchmarks/bench_decode.py --batches 1 8 64 --steps 8 --reps 6
    python benchmarks/bench_decode.py --profile       # also profile both at the largest batch, op by op
    python benchmarks/bench_decode.py --compile       # also Shardline with compile=True, eager vs compiled

With --compile a second runner (EngineConfig(compile=True): torch.compile'd decode steps padded to
fixed buckets, sharding/compiled.py) joins the same rotation; its first decode step at each batch
size builds that bucket's graphs and is reported as the compile time (the step included).

Reported: medians of per-step time over repetitions, ratios of medians, and the ratio of the
fastest repetitions (on a machine shared with other jobs, the least disturbed measurement).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # the repo root, for `python benchmarks/...`

# isort: off
from benchmarks import common  # noqa: E402  (first: it sets OpenMP's wait policy before torch loads)
# isort: on

import torch  # noqa: E402

from benchmarks.workload import same_length_prompts  # noqa: E402

HEADERS = ["batch", "Shardline ms/step", "HF ms/step", "HF/Shardline", "floor ms", "Shardline/floor",
           "compute floor ms", "Shardline/compute floor"]


# ------------------------------------------------------------------------------ Shardline side


class ShardlineDecoder:
    """Drives one single-rank ModelRunner by hand, the way the engine would (see tests/distributed/harness.py)."""

    def __init__(self, model: str, max_batch: int, max_len: int, block_size: int = 16, compile: bool = False):
        from scheduler.config import EngineConfig
        from sharding.dist import init_single_rank
        from sharding.runner import ModelRunner
        self.block_size = block_size
        self.blocks_per_seq = math.ceil(max_len / block_size)
        config = EngineConfig(model=model, block_size=block_size, max_num_seqs=max_batch,
                              num_kv_blocks=max_batch * self.blocks_per_seq + 1, compile=compile)
        self.runner = ModelRunner(config, init_single_rank())
        self.step_id = 0
        self.seq_ids: list[int] = []
        self.lengths: list[int] = []
        self.last: list[int] = []
        self.generated: list[list[int]] = []
        # CPU seconds per step of each decode() call: on a loaded machine, less disturbed than wall time
        self.cpu_s: list[float] = []

    def weight_bytes(self) -> int:
        return unique_parameter_bytes(self.runner.model)

    def prefill(self, prompts: list[list[int]]) -> None:
        from scheduler.wire import NewSequence, ScheduledSequence, SeqSampling, StepInput
        finished, base = self.seq_ids, (max(self.seq_ids) + 1 if self.seq_ids else 0)
        self.seq_ids = [base + i for i in range(len(prompts))]
        greedy = SeqSampling(temperature=0.0)
        bps = self.blocks_per_seq
        new = [NewSequence(sid, list(p), len(p), list(range(1 + i * bps, 1 + (i + 1) * bps)), greedy)
               for i, (sid, p) in enumerate(zip(self.seq_ids, prompts))]
        sched = [ScheduledSequence(sid, 0, len(p), True) for sid, p in zip(self.seq_ids, prompts)]
        out = self._run(StepInput(self._next_id(), new_sequences=new, scheduled=sched, finished_seq_ids=finished))
        self.lengths = [len(p) for p in prompts]
        self.last = out.token_ids
        self.generated = [[t] for t in out.token_ids]

    def decode(self, steps: int) -> float:
        """Run `steps` decode steps; seconds per step."""
        from scheduler.wire import ScheduledSequence, StepInput
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            sched = [ScheduledSequence(sid, n, 1, True, [t])
                     for sid, n, t in zip(self.seq_ids, self.lengths, self.last)]
            out = self._run(StepInput(self._next_id(), scheduled=sched))
            self.lengths = [n + 1 for n in self.lengths]
            self.last = out.token_ids
            for g, t in zip(self.generated, out.token_ids):
                g.append(t)
        self.cpu_s.append((time.process_time() - cpu) / steps)
        return (time.perf_counter() - start) / steps

    def _run(self, step):
        out = self.runner.execute(step)
        assert out is not None, "a single rank is always the driver"
        return out

    def _next_id(self) -> int:
        self.step_id += 1
        return self.step_id


# ------------------------------------------------------------------------------------- HF side


class HFDecoder:
    """HF LlamaForCausalLM with its own KV cache: prefill once, then one-token forward calls."""

    def __init__(self, model: str):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.cache = None
        self.last: torch.Tensor | None = None
        self.generated: list[list[int]] = []

    def weight_bytes(self) -> int:
        return unique_parameter_bytes(self.model)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> None:
        out = self.model(input_ids=torch.tensor(prompts), use_cache=True)
        self.cache = out.past_key_values
        self.last = out.logits[:, -1].argmax(-1, keepdim=True)   # [B, 1]
        self.generated = [[t] for t in self.last[:, 0].tolist()]

    @torch.inference_mode()
    def decode(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            out = self.model(input_ids=self.last, past_key_values=self.cache, use_cache=True)
            self.cache = out.past_key_values
            self.last = out.logits[:, -1].argmax(-1, keepdim=True)
            for g, t in zip(self.generated, self.last[:, 0].tolist()):
                g.append(t)
        return (time.perf_counter() - start) / steps


def matmul_parameters(module: torch.nn.Module) -> int:
    """Elements of distinct 2-D+ parameters: each costs 2 FLOPs per token (the tied embedding as LM head)."""
    seen, total = set(), 0
    for p in module.parameters():
        if p.dim() >= 2 and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def step_flops(hf_config, params: int, batch: int, context: int) -> float:
    """Matmul FLOPs of one decode step: weights, plus attention's QK^T and PV over `context` keys."""
    attn = 4 * context * hf_config.num_attention_heads * (hf_config.hidden_size // hf_config.num_attention_heads)
    return batch * (2 * params + hf_config.num_hidden_layers * attn)


def unique_parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of distinct parameter storages (a tied embedding / LM head counts once)."""
    seen, total = set(), 0
    for p in module.parameters():
        key = p.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += p.untyped_storage().nbytes()
    return total


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of sequences whose greedy tokens agree up to the shorter length."""
    same = sum(x[:min(len(x), len(y))] == y[:min(len(x), len(y))] for x, y in zip(a, b))
    return same / max(len(a), 1)


# ----------------------------------------------------------------------------------- benchmark


def bench_batch(sl: ShardlineDecoder, hf: HFDecoder, probes: dict, batch: int, args,
                slc: ShardlineDecoder | None = None) -> dict:
    prompts = same_length_prompts(batch, args.prompt_len, sl.runner.hf_config.vocab_size, seed=args.seed)
    sl.prefill(prompts)
    hf.prefill(prompts)
    sl.decode(args.steps)   # warm-up repetition, not counted
    hf.decode(args.steps)
    candidates = {"shardline": lambda: sl.decode(args.steps), "hf": lambda: hf.decode(args.steps)}
    out = {"batch": batch}
    if slc is not None:   # compiled: the first step builds this bucket's graphs
        slc.prefill(prompts)
        out["compile_s"] = slc.decode(1)
        slc.decode(args.steps - 1)
        candidates["compiled"] = lambda: slc.decode(args.steps)
        sl.cpu_s, slc.cpu_s = [], []
    runs = common.interleaved({**candidates, **probes}, args.reps)
    out.update({"shardline_s": common.median(runs["shardline"]), "hf_s": common.median(runs["hf"]), "runs": runs,
                "agree": agreement(sl.generated, hf.generated)})
    if slc is not None:
        out.update({"compiled_s": common.median(runs["compiled"]), "cpu_s": {"eager": sl.cpu_s, "compiled": slc.cpu_s},
                    "agree_compiled": agreement(slc.generated, hf.generated)})
    return out


def compile_numbers(r: dict) -> dict:
    """One batch's eager-vs-compiled figures for the JSON."""
    cpu = common.median(r["cpu_s"]["eager"]) / common.median(r["cpu_s"]["compiled"])
    return {"compiled_ms": 1e3 * r["compiled_s"], "eager_over_compiled": r["shardline_s"] / r["compiled_s"],
            "eager_over_compiled_cpu": cpu, "compile_s": r["compile_s"]}


def compile_section(results: list[dict]) -> str:
    """Eager against compiled Shardline, same run."""
    def cpu(r, side):
        return common.median(r["cpu_s"][side])
    rows = [(r["batch"], 1e3 * r["shardline_s"], 1e3 * r["compiled_s"], r["shardline_s"] / r["compiled_s"],
             min(r["runs"]["shardline"]) / min(r["runs"]["compiled"]), 1e3 * cpu(r, "eager"), 1e3 * cpu(r, "compiled"),
             cpu(r, "eager") / cpu(r, "compiled"), r["compile_s"]) for r in results]
    return "\n".join([
        "### compile=True: eager against compiled decode steps (same run, interleaved)", "",
        common.markdown_table(["batch", "eager ms/step", "compiled ms/step", "eager/compiled (median)",
                               "eager/compiled (fastest)", "eager CPU ms/step", "compiled CPU ms/step",
                               "eager/compiled (CPU time, median)", "first compiled step s (compiles the bucket)"],
                              rows), "",
        "CPU time is the process's (both torch threads), per step: on a machine shared with other jobs it "
        "counts only the time this process ran, so it is the steadier of the two ratios.", "",
        "Noise: " + "; ".join(f"B={r['batch']}: compiled {common.spread(r['runs']['compiled'])}" for r in results)
        + ". Greedy tokens of the compiled runner identical to HF for " + ", ".join(
            f"{100 * r['agree_compiled']:.0f}% of sequences at B={r['batch']}" for r in results) + "."])


def _label(obj, attr: str, name: str, undo: list) -> None:
    """Wrap obj.attr in a profiler range called `name`; `undo` collects how to put it back."""
    from torch.profiler import record_function
    fn = getattr(obj, attr)
    had = attr in vars(obj)

    def inner(*a, **k):
        with record_function(name):
            return fn(*a, **k)
    setattr(obj, attr, inner)
    undo.append(lambda: setattr(obj, attr, fn) if had else delattr(obj, attr))


def profile_both(sl: ShardlineDecoder, hf: HFDecoder, batch: int, args) -> str:
    """torch.profiler over --steps decode steps at `batch`, Shardline then HF, ops side by side.

    Shardline's phases are labelled by wrapping the runner's methods at run time (input
    preparation, paged attention core, LM head, sampler); nothing outside benchmarks/ changes.
    """
    from torch.profiler import ProfilerActivity, profile

    from sharding.layers.attention import PagedAttention
    prompts = same_length_prompts(batch, args.prompt_len, sl.runner.hf_config.vocab_size, seed=args.seed + 1)
    undo: list = []
    _label(sl.runner, "_prepare", "phase::prepare inputs + mask", undo)
    _label(sl.runner.model, "logits", "phase::lm_head", undo)
    _label(sl.runner, "sampler", "phase::sampler", undo)
    _label(PagedAttention, "forward", "phase::paged attention (cache write, gather, sdpa)", undo)
    steps, per_step, averages = args.profile_steps, {}, {}
    try:
        for name, dec in (("shardline", sl), ("hf", hf)):
            dec.prefill(prompts)
            dec.decode(2)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                per_step[name] = dec.decode(steps)
            averages[name] = {e.key: e for e in prof.key_averages()}
    finally:
        for fn in reversed(undo):
            fn()
    sl_ev, hf_ev = averages["shardline"], averages["hf"]

    def pct(us: float, side: str) -> str:
        return f"{100 * us / 1e6 / steps / per_step[side]:.0f}%"
    phases = sorted((e for k, e in sl_ev.items() if k.startswith("phase::")), key=lambda e: -e.cpu_time_total)
    lines = [f"### Decode profile at batch {batch} (torch.profiler, {steps} steps each; under the profiler "
             f"Shardline {1e3 * per_step['shardline']:.0f} ms/step, HF {1e3 * per_step['hf']:.0f} ms/step)", "",
             "Shardline phases (inclusive CPU time; paged attention summed over all layers):", "",
             common.markdown_table(["phase", "ms/step", "% of step"], [
                 (e.key.removeprefix("phase::"), e.cpu_time_total / 1e3 / steps, pct(e.cpu_time_total, "shardline"))
                 for e in phases]), "",
             "Top ops by self CPU time, Shardline against HF on the same batch:", ""]
    ops = sorted({k for k in (*sl_ev, *hf_ev) if not k.startswith("phase::")},
                 key=lambda k: -max(sl_ev[k].self_cpu_time_total if k in sl_ev else 0,
                                    hf_ev[k].self_cpu_time_total if k in hf_ev else 0))

    def cells(ev, k, side):
        if k not in ev:
            return ["-", "-", "-"]
        e = ev[k]
        return [e.count // steps, e.self_cpu_time_total / 1e3 / steps, pct(e.self_cpu_time_total, side)]
    lines.append(common.markdown_table(
        ["op", "Shardline calls/step", "Shardline self ms/step", "% of step", "HF calls/step", "HF self ms/step",
         "% of step"],
        [[k, *cells(sl_ev, k, "shardline"), *cells(hf_ev, k, "hf")] for k in ops[:args.profile_top]]))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", help="HF model folder (default: the bundled SmolLM2, converted once)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="batch sizes (default: 1 64)")
    ap.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence (default: 32)")
    ap.add_argument("--steps", type=int, default=4, help="decode steps per timed repetition (default: 4)")
    ap.add_argument("--reps", type=int, default=20,
                    help="timed repetitions per side, interleaved; many short ones resist load bursts (default: 20)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both sides (default: 2)")
    ap.add_argument("--bandwidth-gb", type=float, default=1.0, help="size of the bandwidth probe (default: 1 GB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="also profile both sides' decode at the largest batch")
    ap.add_argument("--profile-steps", type=int, default=8, help="decode steps profiled per side (default: 8)")
    ap.add_argument("--profile-top", type=int, default=15, help="ops listed by --profile (default: 15)")
    ap.add_argument("--compile", action="store_true",
                    help="also time Shardline with compile=True (torch.compile'd decode steps), interleaved")
    ap.add_argument("--quick", action="store_true", help="smoke test: batches 1 and 4, 4 steps, 2 reps")
    ap.add_argument("--output", help="append the markdown result to this file")
    ap.add_argument("--json", help="write the numbers as JSON to this file (run_all.py plots them)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batches, args.steps, args.reps, args.bandwidth_gb, args.profile_steps = [1, 4], 4, 2, 0.25, 4
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    common.set_threads(args.threads)
    model = common.model_path(args.model)
    max_len = args.prompt_len + max((args.reps + 2) * args.steps, args.profile_steps + 4) + 4
    print(f"model {model}; {common.machine_line()}", file=sys.stderr)
    sl = ShardlineDecoder(model, max(args.batches), max_len)
    hf = HFDecoder(model)
    slc = ShardlineDecoder(model, max(args.batches), max_len, compile=True) if args.compile else None
    weight_bytes = sl.weight_bytes()
    probes = {"bandwidth": common.memory_bandwidth_gbs(args.bandwidth_gb), "gflops": common.matmul_gflops()}
    results = []
    from tqdm.auto import tqdm
    for batch in tqdm(args.batches, desc="decode batches", file=sys.stderr):
        results.append(bench_batch(sl, hf, probes, batch, args, slc))
    gbs = common.median([g for r in results for g in r["runs"]["bandwidth"]])
    gflops = common.median([g for r in results for g in r["runs"]["gflops"]])
    floor_s = weight_bytes / (gbs * 1e9)
    cfg = sl.runner.hf_config
    params = matmul_parameters(sl.runner.model)
    mean_ctx = args.prompt_len + (args.reps + 2) * args.steps // 2   # mean context over the timed steps
    compute_s = {r["batch"]: step_flops(cfg, params, r["batch"], mean_ctx) / (gflops * 1e9) for r in results}
    rows = [(r["batch"], 1e3 * r["shardline_s"], 1e3 * r["hf_s"], r["hf_s"] / r["shardline_s"], 1e3 * floor_s,
             r["shardline_s"] / floor_s, 1e3 * compute_s[r["batch"]], r["shardline_s"] / compute_s[r["batch"]])
            for r in results]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    text = "\n".join([
        "## Decode step time, single rank (bench_decode.py)", "",
        f"Model {model} ({weight_bytes / 1e6:.0f} MB of weights, fp32); {args.prompt_len}-token prompts, "
        f"{args.reps} interleaved repetitions of {args.steps} greedy steps after one warm-up repetition; "
        f"{args.threads} threads. Memory read bandwidth (sum of a {args.bandwidth_gb:g} GB tensor, same run, "
        f"median): {gbs:.1f} GB/s; fp32 matmul (1024^3, same run, median): {gflops:.0f} GFLOP/s. "
        f"{common.machine_line()}.", "",
        "floor = weight bytes / bandwidth (reading every weight once per step); compute floor = matmul FLOPs of "
        f"one step ({2 * params / 1e6:.0f} MFLOP per token plus attention) / the matmul rate. Ratios above 1 "
        "mean slower than the reference.", "",
        common.markdown_table(HEADERS, rows), "",
        "Noise (max deviation from the median over repetitions): " + "; ".join(
            f"B={r['batch']}: Shardline {common.spread(r['runs']['shardline'])}, HF {common.spread(r['runs']['hf'])}"
            for r in results) + ".",
        "Ratio HF/Shardline of the fastest repetitions (less sensitive to load from other processes): " + ", ".join(
            f"B={r['batch']}: {min(r['runs']['hf']) / min(r['runs']['shardline']):.2f}" for r in results) + ".",
        "Greedy tokens identical to HF for " + ", ".join(
            f"{100 * r['agree']:.0f}% of sequences at B={r['batch']}" for r in results) + ".",
        f"The floor counts weights only; the KV cache adds {kv_per_token / 1e3:.0f} kB per cached token "
        f"(at B={results[-1]['batch']} and ~{mean_ctx} tokens of context: "
        f"{results[-1]['batch'] * mean_ctx * kv_per_token / 1e6:.0f} MB "
        "per step).",
    ])
    if slc is not None:
        text += "\n\n" + compile_section(results)
    if args.profile:
        text += "\n\n" + profile_both(sl, hf, max(args.batches), args)
    print(text)
    common.write_result(args.output, text)
    data = {"benchmark": "decode", "weight_bytes": weight_bytes, "bandwidth_gbs": gbs, "floor_ms": 1e3 * floor_s,
            "matmul_gflops": gflops,
            "rows": [dict(zip(["batch", "shardline_ms", "hf_ms", "hf_over_shardline", "floor_ms",
                               "shardline_over_floor", "compute_floor_ms", "shardline_over_compute_floor"], row))
                     | (compile_numbers(r) if slc is not None else {})
                     for row, r in zip(rows, results)],
            "runs": {r["batch"]: r["runs"] for r in results}}
    if args.json:
        import json
        pathlib.Path(args.json).write_text(json.dumps(data, indent=1))
    return data


if __name__ == "__main__":
    main()
