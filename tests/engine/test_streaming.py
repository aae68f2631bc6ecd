"""Streaming: `AsyncLLMEngine.generate` and `LLM.generate_stream` yield deltas that add up to `generate`.

In-process (LocalExecutor, tiny Llama): no Ray. Leaving a stream early aborts its request and
frees its KV blocks; requests that arrive while others stream join the running batch.
"""

from __future__ import annotations

import asyncio

import pytest

from cluster import LLM, SamplingParams
from scheduler.async_engine import AsyncLLMEngine
from tests.fixtures.reference import hf_greedy

pytestmark = pytest.mark.timeout(120)

PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15], [21, 22]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), num_kv_blocks=64, block_size=4) as llm:
        yield llm


def _same(joined, out) -> bool:
    """Text and tokens identical; logprobs within 1e-4 (batch composition changes float sums)."""
    text, ids, logprobs = joined
    c = out.outputs[0]
    return (text, ids) == (c.text, c.token_ids) and len(logprobs) == len(c.logprobs) and all(
        a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a) for a, b in zip(logprobs, c.logprobs))


def _join(deltas):
    return ("".join(d.outputs[0].text for d in deltas), [t for d in deltas for t in d.outputs[0].token_ids],
            [lp for d in deltas for lp in d.outputs[0].logprobs])


def test_generate_stream_deltas_add_up_to_generate_and_hf(llm, tiny_llama_dir):
    whole = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    for prompt, out in zip(PROMPTS, whole, strict=True):
        deltas = list(llm.generate_stream({"prompt_token_ids": prompt}, GREEDY))
        assert len(deltas) == GREEDY.max_tokens          # one token per step, one delta per token
        assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
        assert deltas[-1].outputs[0].finish_reason == "length"
        assert _same(_join(deltas), out)
        assert _join(deltas)[1] == hf_greedy(str(tiny_llama_dir), prompt, GREEDY.max_tokens)[0]


def test_generate_stream_closed_early_frees_blocks(llm):
    stream = llm.generate_stream({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    llm.engine.step()   # aborts apply at the start of a step
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.all_blocks_free()


def test_async_engine_streams_concurrently_and_cancel_aborts(llm):
    expected = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    engine = AsyncLLMEngine(llm.engine)

    async def collect(i, prompt):
        await asyncio.sleep(0.01 * i)   # later requests join a running batch
        return [d async for d in engine.generate(prompt, GREEDY, f"r{i}")]

    async def cancel_one():
        gen = engine.generate(PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True), "cancelled")
        await gen.__anext__()
        await gen.aclose()

    async def main():
        results = await asyncio.gather(*(collect(i, p) for i, p in enumerate(PROMPTS)), cancel_one())
        for _ in range(200):   # the abort lands at the next step
            if not llm.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)
        return results[:-1]

    try:
        streams = asyncio.run(main())
        for deltas, out in zip(streams, expected, strict=True):
            assert _same(_join(deltas), out)
        assert llm.engine.all_blocks_free()
        snap = engine.snapshot()
        assert snap["generation_tokens"] >= 3 * GREEDY.max_tokens
        assert snap["time_to_first_token_seconds"]["count"] == 4
        assert snap["request_success"]["length"] == 3 and snap["request_success"]["abort"] == 1
    finally:
        engine.shutdown()


def test_cancelling_5_of_20_streams_leaves_the_other_15_undisturbed(llm):
    """Issue 12 test 9: 20 concurrent streams, 5 closed after their second delta; the other 15 equal a
    run without them (tokens, text, logprobs within 1e-4), and every KV block is free afterwards."""
    prompts = [[5 + i, 6 + 2 * i, 7, 100 + i][:2 + i % 3] for i in range(20)]
    cancelled = set(range(0, 20, 4))
    kept = [i for i in range(20) if i not in cancelled]
    undisturbed = llm.generate([{"prompt_token_ids": prompts[i]} for i in kept], GREEDY, use_tqdm=False)
    engine = AsyncLLMEngine(llm.engine)

    async def one(i):
        deltas = []
        gen = engine.generate(prompts[i], GREEDY, f"c{i}")
        async for d in gen:
            deltas.append(d)
            if i in cancelled and len(deltas) == 2:
                await gen.aclose()
                break
        return deltas

    async def main():
        streams = await asyncio.gather(*(one(i) for i in range(20)))
        for _ in range(200):   # the aborts land at the next step
            if not llm.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.02)
        return streams

    try:
        streams = asyncio.run(main())
        for i, out in zip(kept, undisturbed, strict=True):
            assert streams[i][-1].outputs[0].finish_reason == "length"
            assert _same(_join(streams[i]), out), f"stream {i}"
        assert all(len(streams[i]) == 2 and not streams[i][-1].finished for i in cancelled)
        assert not llm.engine.has_unfinished_requests() and llm.engine.all_blocks_free()
        assert engine.snapshot()["request_success"].get("abort") == len(cancelled)
    finally:
        engine.shutdown()
