"""Overload, deadlines and drain on the toy executor (deterministic, no processes).

- a bounded waiting queue: past `max_waiting_requests` a new request raises `QueueFullError`
  (retryable, not a ValueError) and nothing of it is queued;
- open-loop load at 3x capacity: every offered request is accepted or rejected at once, every
  accepted one completes with the output of an unloaded run, and the queue never exceeds its bound;
- `SamplingParams.timeout` ends a waiting or a running request with finish_reason "timeout";
- `AsyncLLMEngine.drain`: new requests refused, running ones finish (or are aborted at timeout 0).
"""

from __future__ import annotations

import asyncio
import threading
import types

import pytest

from scheduler.async_engine import AsyncLLMEngine
from scheduler.config import EngineConfig
from scheduler.engine import LLMEngine
from scheduler.errors import EngineDrainingError, QueueFullError, SamplingParamsError
from scheduler.sampling_params import SamplingParams
from tests.unit.toy_model import EOS, ToyExecutor, make_tokenizer, reference

TOKENIZER = make_tokenizer()
MAX_LEN = 200


def _engine(max_waiting=None, max_num_seqs=8, num_blocks=256, executor=None) -> LLMEngine:
    cfg = EngineConfig(model="toy", block_size=4, max_num_seqs=max_num_seqs, max_waiting_requests=max_waiting)
    return LLMEngine(cfg, executor or ToyExecutor(num_blocks, 4), TOKENIZER, [EOS], MAX_LEN)


def _params(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _run(eng: LLMEngine) -> dict:
    outs = {}
    while eng.has_unfinished_requests():
        outs.update((o.request_id, o) for o in eng.step() if o.finished)
    return outs


def test_a_full_queue_raises_queue_full_and_queues_nothing():
    eng = _engine(max_waiting=3)
    for i in range(3):
        eng.add_request(f"r{i}", [1, 2, 3], _params(4))
    with pytest.raises(QueueFullError, match="max_waiting_requests=3") as err:
        eng.add_request("r3", [1, 2, 3], _params(4))
    assert not isinstance(err.value, ValueError) and err.value.retry_after_s > 0
    with pytest.raises(QueueFullError):      # atomic: a batch that does not fit is refused whole
        eng.add_requests([eng.make_request("a", [1], _params(2))])
    assert eng.get_num_unfinished_requests() == 3
    eng.step()                               # the three start running: the queue has room again
    assert eng.num_waiting_requests == 0
    eng.add_requests([eng.make_request(f"b{i}", [4, 5], _params(3)) for i in range(3)])
    outs = _run(eng)
    assert sorted(outs) == ["b0", "b1", "b2", "r0", "r1", "r2"] and eng.all_blocks_free()


def test_max_waiting_requests_is_validated():
    for bad in (0, -1, 2.0, "8", True):
        with pytest.raises(ValueError, match="max_waiting_requests"):
            EngineConfig(model="toy", max_waiting_requests=bad)


def test_open_loop_load_at_three_times_capacity_loses_nothing():
    """Arrivals do not wait for completions (open loop): 3 requests per 2 steps against a capacity of
    4 running x 1 request per 8 steps = 0.5 per step. Counts are printed for the report."""
    eng = _engine(max_waiting=4, max_num_seqs=4)
    offered, accepted, rejected, done = 0, [], 0, {}
    prompts = {}
    for tick in range(240):
        for _ in range(3 if tick % 2 else 0):
            rid, prompt = f"q{offered}", [1 + offered % 60, 2 + offered % 7, 3]
            offered += 1
            try:
                eng.add_request(rid, prompt, _params(8))
                accepted.append(rid)
                prompts[rid] = prompt
            except QueueFullError:
                rejected += 1
        assert eng.num_waiting_requests <= 4
        done.update((o.request_id, o) for o in eng.step() if o.finished)
    done.update(_run(eng))
    failed = [rid for rid in accepted if rid not in done or done[rid].outputs[0].finish_reason != "length"]
    print(f"open loop at 3x capacity: offered={offered} accepted={len(accepted)} rejected={rejected} "
          f"failed={len(failed)}")
    assert offered == len(accepted) + rejected and not failed
    assert rejected > offered / 2            # the bound held: most of a 3x overload is turned away at once
    for rid in accepted:
        assert done[rid].outputs[0].token_ids == reference(prompts[rid], 8, ignore_eos=True, max_len=MAX_LEN)[0]
    assert eng.all_blocks_free()


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf"), "5", True])
def test_timeout_must_be_a_positive_number(bad):
    with pytest.raises(SamplingParamsError, match="timeout"):
        SamplingParams(timeout=bad)


def test_timeout_ends_running_and_waiting_requests(monkeypatch):
    clock = types.SimpleNamespace(now=1000.0)
    fake_time = types.SimpleNamespace(monotonic=lambda: clock.now, time=lambda: clock.now)
    monkeypatch.setattr("scheduler.engine.time", fake_time)
    eng = _engine(max_num_seqs=1)                                    # one runs, the others wait
    eng.add_request("running", [1, 2, 3], _params(100, timeout=5.0))
    eng.add_request("waiting", [4, 5, 6], _params(100, timeout=5.0))
    eng.add_request("free", [7, 8], _params(6))                      # no deadline: unaffected
    for _ in range(3):
        eng.step()
    clock.now += 5.0
    outs = _run(eng)
    run, wait = outs["running"].outputs[0], outs["waiting"].outputs[0]
    assert run.finish_reason == wait.finish_reason == "timeout"
    assert 1 <= len(run.token_ids) < 100 and wait.token_ids == []
    assert run.token_ids == reference([1, 2, 3], 100, ignore_eos=True)[0][:len(run.token_ids)]
    assert outs["free"].outputs[0].token_ids == reference([7, 8], 6, ignore_eos=True)[0]
    assert eng.all_blocks_free() and not eng._deadlines


class GatedExecutor(ToyExecutor):
    """The toy, but every step waits for `gate` (so a test can hold requests mid-flight)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.gate = threading.Event()
        self.gate.set()

    def execute(self, steps):
        assert self.gate.wait(timeout=60), "the test never reopened the gate"
        return super().execute(steps)


async def _collect(engine: AsyncLLMEngine, rid: str, prompt, params, first: asyncio.Event | None = None):
    deltas = []
    async for d in engine.generate(prompt, params, rid):
        deltas.append(d)
        if first is not None:
            first.set()
    return [t for d in deltas for t in d.outputs[0].token_ids], deltas[-1].outputs[0].finish_reason


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout_s", [30.0, 0.0])
def test_drain_refuses_new_requests_then_finishes_or_aborts_the_running(timeout_s):
    ex = GatedExecutor(256, 4)
    llm_engine = _engine(executor=ex)
    aborted = threading.Event()
    abort = llm_engine.abort_request
    llm_engine.abort_request = lambda rid: (abort(rid), aborted.set())
    engine = AsyncLLMEngine(llm_engine)
    prompts = {f"d{i}": [1 + i, 2, 3] for i in range(3)}

    async def main():
        firsts = {rid: asyncio.Event() for rid in prompts}
        tasks = [asyncio.create_task(_collect(engine, rid, p, _params(150), firsts[rid])) for rid, p in prompts.items()]
        for ev in firsts.values():
            await ev.wait()
        ex.gate.clear()                                    # hold them mid-flight
        drain = asyncio.create_task(asyncio.to_thread(engine.drain, timeout_s))
        while not engine.draining:
            await asyncio.sleep(0.01)
        with pytest.raises(EngineDrainingError):
            await _collect(engine, "late", [9, 9], _params(2))
        if timeout_s == 0:                                 # reopen only once the aborts are queued
            while not aborted.is_set():
                await asyncio.sleep(0.01)
        ex.gate.set()
        return await asyncio.gather(*tasks), await drain

    try:
        results, counts = asyncio.run(main())
    finally:
        engine.shutdown()
    assert counts["in_flight"] == 3
    for (tokens, reason), prompt in zip(results, prompts.values(), strict=True):
        full = reference(prompt, 150, ignore_eos=True)[0]
        if timeout_s:
            assert (tokens, reason) == (full, "length")
        else:
            assert reason == "abort" and tokens == full[:len(tokens)] and len(tokens) < 150
    assert counts["aborted"] == (0 if timeout_s else 3)
    assert engine.engine.all_blocks_free() and not engine.engine.has_unfinished_requests()
