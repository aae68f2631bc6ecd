"""Run ModelRunners as plain gloo processes (no Ray, no engine) and collect what they computed.

The parent plays the scheduler: it gives every rank the same `StepInput`s. Sampled tokens come
from the last stage's TP rank 0 and are broadcast to all ranks so the next step's diff is the
same everywhere (in production the engine sends them).
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scheduler.config import EngineConfig
from scheduler.wire import NewSequence, ScheduledSequence, SeqSampling, StepInput
from sharding.dist import free_port, init_replica


@dataclass
class Job:
    model: str
    prompts: list[list[int]]
    new_tokens: int
    dtype: str = "float32"
    block_size: int = 16
    quantization: str | None = None
    compile: bool = False


@dataclass
class RankResult:
    backend: str = ""                         # the collective backend this rank really used
    prefill_logits: list | None = None       # [num prompts] tensors [vocab], last stage only
    tokens: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    loaded_bytes: int = 0
    rss_before_kb: int = 0
    peak_rss_kb: int = 0
    peak_anon_kb: int = 0
    quant: dict | None = None                # the rank's QuantReport, when quantized
    compiled_graphs: int = 0                 # graphs torch.compile built in this process (compile=True)


def _rss_anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def _run_job(job: Job, tp: int, pp: int, groups) -> RankResult:
    from sharding.plan import load_hf_config
    from sharding.runner import ModelRunner

    load_hf_config(job.model)   # imports transformers first: its modules are not model memory
    res = RankResult(backend=groups.backend, rss_before_kb=_rss_anon_kb())
    peak = [res.rss_before_kb]
    # sample private memory while loading, from a thread (ru_maxrss also counts mmapped file pages)
    import threading
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon_kb())
            done.wait(0.005)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    need = max(len(p) for p in job.prompts) + job.new_tokens
    blocks_per_seq = -(-need // job.block_size)
    config = EngineConfig(model=job.model, tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype=job.dtype,
                          block_size=job.block_size, quantization=job.quantization, compile=job.compile,
                          num_kv_blocks=blocks_per_seq * len(job.prompts) + 1)
    runner = ModelRunner(config, groups)
    done.set()
    t.join()
    res.peak_anon_kb = max(peak[0], _rss_anon_kb())
    res.peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res.loaded_bytes = runner.loaded_bytes
    res.quant = runner.quant_report

    greedy = SeqSampling(temperature=0.0)
    new = [NewSequence(i, list(p), len(p), list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq)), greedy)
           for i, p in enumerate(job.prompts)]
    # prefill logits (then forget the sequences so the decode run starts clean)
    logits = runner.forward_logits(StepInput(0, new_sequences=new, scheduled=[
        ScheduledSequence(i, 0, len(p), True) for i, p in enumerate(job.prompts)]))
    if logits is not None:
        res.prefill_logits = [row.clone() for row in logits]
    runner.seqs.clear()
    # greedy decode through the block KV cache: prefill all, then one token per step
    scheduled = [ScheduledSequence(i, 0, len(p), True) for i, p in enumerate(job.prompts)]
    step = StepInput(1, new_sequences=new, scheduled=scheduled)
    tokens = [[] for _ in job.prompts]
    logprobs = [[] for _ in job.prompts]
    for k in range(job.new_tokens):
        out = runner.execute(step)
        payload = [None]
        if out is not None:
            payload = [(out.token_ids, out.logprobs)]
        if groups.world_size > 1:
            dist.broadcast_object_list(payload, src=groups.world_size - tp)
        toks, lps = payload[0]
        for i, (t, lp) in enumerate(zip(toks, lps)):
            tokens[i].append(t)
            logprobs[i].append(lp)
        step = StepInput(k + 2, scheduled=[
            ScheduledSequence(i, len(p) + k, 1, True, [tokens[i][-1]]) for i, p in enumerate(job.prompts)])
    res.tokens, res.logprobs = tokens, logprobs
    if job.compile:
        from torch._dynamo.utils import counters
        res.compiled_graphs = int(counters["stats"]["unique_graphs"])
    return res


def _worker(rank: int, tp: int, pp: int, port: int, jobs: list[Job], out_dir: str, backend: str) -> None:
    torch.set_num_threads(1)
    groups = init_replica(rank, tp, pp, "127.0.0.1", port, timeout_s=120, local_rank=rank,
                          force_cpu=backend == "gloo")
    try:
        results = [_run_job(job, tp, pp, groups) for job in jobs]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        groups.destroy()


def run_layout(jobs: list[Job], tp: int, pp: int, backend: str = "gloo",
               timeout_s: float = 600.0) -> dict[int, list[RankResult]]:
    """Run every job at layout (tp, pp) over `backend` ("gloo": CPU even with GPUs; "nccl": CUDA).

    Returns rank -> one RankResult per job. The rank processes are terminated in a `finally`,
    whatever happens: a failed rank, this deadline, or pytest-timeout interrupting the wait.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(tp, pp, free_port("127.0.0.1"), jobs, out_dir, backend),
                                 nprocs=tp * pp, join=False, start_method="spawn")
        try:
            deadline = time.monotonic() + timeout_s
            while not ctx.join(timeout=1.0):   # raises ProcessRaisedException if a rank failed
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tp={tp} pp={pp}: ranks still running after {timeout_s:.0f} s")
        finally:
            terminate(ctx.processes)
        return {r: torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(tp * pp)}


def terminate(processes, grace_s: float = 5.0) -> None:
    """SIGTERM every live process, then SIGKILL what is left after `grace_s`; reap them all."""
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(grace_s)
        if p.is_alive():
            p.kill()
            p.join(grace_s)


def driver_rank(tp: int, pp: int) -> int:
    """Global rank of the last stage's TP rank 0."""
    return (pp - 1) * tp


# -- comparing a layout with transformers ------------------------------------------------------

def hf_references(models: dict[str, str], prompts: list[list[int]], new_tokens: int) -> dict:
    """{name: (HF greedy (tokens, logprobs) per prompt, HF last-position prefill logits per prompt)}."""
    from tests.fixtures.reference import hf_greedy, hf_prefill_logits

    return {name: ([hf_greedy(d, p, new_tokens) for p in prompts], [hf_prefill_logits(d, p)[-1] for p in prompts])
            for name, d in models.items()}


def assert_matches_hf(result: RankResult, reference: tuple, what: str, tol: float = 1e-4) -> tuple[float, float]:
    """The driver rank's prefill logits, greedy tokens and logprobs equal HF's; returns the largest differences."""
    greedy, prefill = reference
    logit_diff = max((result.prefill_logits[i] - ref).abs().max().item() for i, ref in enumerate(prefill))
    assert logit_diff <= tol, f"{what}: prefill logits differ by {logit_diff:.2e}"
    lp_diff = 0.0
    for i, (ref_tokens, ref_logprobs) in enumerate(greedy):
        assert result.tokens[i] == ref_tokens, f"{what} prompt {i}: tokens differ from HF"
        lp_diff = max(lp_diff, max(abs(a - b) for a, b in zip(result.logprobs[i], ref_logprobs)))
        assert lp_diff <= tol, f"{what} prompt {i}: logprobs differ by {lp_diff:.2e}"
    return logit_diff, lp_diff
