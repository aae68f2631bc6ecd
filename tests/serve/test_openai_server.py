"""`shardline serve` at PP=2 x DP=2 on the tiny Llama, through the official `openai` client and raw HTTP.

The server is tests/serve/conftest.py's `server`, shared with test_http_errors.py (its start-up is
the expensive part); the test that kills an engine worker runs after every other user of it.
Greedy outputs are compared with `transformers`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer

from tests.fixtures.reference import hf_greedy, hf_prefill_logits
from tests.serve.conftest import API_KEY, EXTRA, MODEL, REPO, metrics, no_leak, settled_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.timeout(600)]

PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15], [21, 22], [40, 41, 42, 43]]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def hf_tok(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def _wait_for(cond, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _text(hf_tok, tokens) -> str:
    """HF's decode of greedy tokens, minus a trailing incomplete UTF-8 character (U+FFFD), which the
    incremental detokenizer holds back - offline `LLM.generate` returns the same text."""
    return hf_tok.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")


def test_completion_and_chat_equal_transformers_greedy(client, tiny_llama_dir, hf_tok):
    assert [m.id for m in client.models.list().data] == [MODEL]
    for prompt in PROMPTS[:2]:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body=EXTRA)
        tokens = hf_greedy(str(tiny_llama_dir), prompt, MAX_TOKENS)[0]
        assert r.choices[0].text == _text(hf_tok, tokens)
        assert r.choices[0].finish_reason == "length"
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), MAX_TOKENS)
    # vLLM's prompt_logprobs extension field: per prompt token {id: {"logprob"}}, first None, equal to HF
    prompt = PROMPTS[1]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0,
                                  extra_body={"prompt_logprobs": 2})
    got, want = r.choices[0].prompt_logprobs, torch.log_softmax(hf_prefill_logits(tiny_llama_dir, prompt), -1)
    assert got[0] is None and len(got) == len(prompt) and all(len(d) in (2, 3) for d in got[1:])
    for i in range(1, len(prompt)):
        assert abs(got[i][str(prompt[i])]["logprob"] - want[i - 1, prompt[i]].item()) < 1e-4
    messages = [{"role": "user", "content": "hello there"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                       extra_body=EXTRA)
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = hf_tok(rendered, add_special_tokens=False)["input_ids"]
    tokens = hf_greedy(str(tiny_llama_dir), ids, MAX_TOKENS)[0]
    assert r.choices[0].message.content == _text(hf_tok, tokens)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids)


def test_streamed_text_equals_non_streamed_with_usage(client):
    kw = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0, extra_body=EXTRA)
    whole = client.completions.create(prompt="abc def", **kw)
    chunks = list(client.completions.create(prompt="abc def", stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert chunks[-2].choices[0].finish_reason == "length"
    messages = [{"role": "user", "content": "tell me"}]
    whole = client.chat.completions.create(messages=messages, **kw)
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert all(c.usage is None for c in chunks)   # include_usage not asked for


def test_32_concurrent_streams_all_complete(server, client):
    expected = [client.completions.create(model=MODEL, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body=EXTRA).choices[0].text for p in PROMPTS]
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=300)

    async def one(i):
        stream = await aclient.completions.create(model=MODEL, prompt=PROMPTS[i % 4], max_tokens=MAX_TOKENS,
                                                  temperature=0, stream=True, extra_body=EXTRA)
        parts, reason = [], None
        async for c in stream:
            parts.append(c.choices[0].text)
            reason = c.choices[0].finish_reason or reason
        return "".join(parts), reason

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert [r for r in results] == [(expected[i % 4], "length") for i in range(32)]


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    before = metrics(server).get("shardline:request_success_total[abort]", 0)
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # the client is gone: the request is aborted, nothing runs, every replica's KV cache is free
    m = _wait_for(lambda: (m := metrics(server)).get("shardline:request_success_total[abort]", 0) > before and m,
                  "the abort to be counted")
    m = _wait_for(lambda: (m := metrics(server))["shardline:num_requests_running"] == 0
                  and m["shardline:kv_cache_usage_perc"] == 0 and m, "blocks to be freed")
    assert m["shardline:num_requests_waiting"] == 0


def test_overload_answers_429_or_503_with_retry_after_and_loses_nothing(server):
    """A burst of 150 against 100 ongoing + 64 queued at the ingress and, per engine replica, 8 running +
    32 waiting: the engines' bounded queues answer 429, Serve's queue 503, both with Retry-After; every
    request gets one of 200 / 429 / 503, and every 200 is a complete output."""
    # 64 tokens each: long enough that the engines' queues fill even with the pipelined engine, which
    # finishes requests faster than the burst's 150 HTTP posts arrive at 32 tokens (0 got 429 once)
    body = {"model": MODEL, "prompt": [5, 6], "max_tokens": 64, "temperature": 0, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            return await asyncio.gather(*(c.post(f"{server.url}/v1/completions", json=body) for _ in range(150)))

    rs = asyncio.run(main())
    codes = [r.status_code for r in rs]
    print(f"burst of 150: {codes.count(200)} accepted, {codes.count(429)} got 429, {codes.count(503)} got 503")
    assert set(codes) <= {200, 429, 503} and 429 in codes, codes
    assert codes.count(200) >= 16
    for r in rs:
        if r.status_code == 200:
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert r.json()["usage"]["completion_tokens"] == 64
        else:   # ours (JSON) or Serve's proxy (text, for its own queue): both say when to retry
            assert int(r.headers["retry-after"]) >= 1, (r.status_code, r.headers, r.text)
            if r.headers["content-type"].startswith("application/json"):
                err = r.json()["error"]
                assert err["code"] == r.status_code and err["message"]
            else:
                assert r.status_code == 503 and "queue" in r.text.lower(), r.text
    queue_full = next(r for r in rs if r.status_code == 429).json()["error"]
    assert queue_full["type"] == "rate_limit_error" and "max_waiting_requests" in queue_full["message"]


def test_request_timeout_ends_with_finish_reason_timeout(client):
    """`timeout` (seconds, Shardline's extension field): the request ends early with finish_reason "timeout"
    and the tokens produced so far; 240 pipelined steps over Ray take far longer than 10 ms."""
    out = client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=240, temperature=0,
                                    extra_body={**EXTRA, "timeout": 0.01})
    assert out.choices[0].finish_reason == "timeout" and out.usage.completion_tokens < 240
    out = client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=3, temperature=0,
                                    extra_body={**EXTRA, "timeout": 600})
    assert out.choices[0].finish_reason == "length"


def test_metrics_parse_and_counters_move(server, client):
    before = settled_metrics(server)   # the previous test's last request may not have been pushed yet
    client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=4, temperature=0, extra_body=EXTRA)
    after = _wait_for(lambda: (m := metrics(server))["shardline:generation_tokens_total"]
                      >= before["shardline:generation_tokens_total"] + 4 and m, "counters to move")
    assert after["shardline:prompt_tokens_total"] >= before["shardline:prompt_tokens_total"] + 3
    for h in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert after[f"shardline:{h}_count"] > before[f"shardline:{h}_count"]
        assert after[f"shardline:{h}_sum"] > 0
    assert after["shardline:request_success_total[length]"] > before["shardline:request_success_total[length]"]


SECOND_DRIVER = """
import json, sys
from cluster import connect, PromptTooLongError, SamplingParams
h = connect("t")
p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
outs = h.generate([{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [11, 12, 13, 14, 15]}], p)
deltas = list(h.stream({"prompt_token_ids": [5, 6, 7]}, p))
async def astream():
    return [d async for d in h.stream({"prompt_token_ids": [21, 22]}, p)]
import asyncio
adeltas = asyncio.run(astream())
try:
    h.generate([{"prompt_token_ids": [5]}, {"prompt_token_ids": list(range(5, 305))}], p)
    err = None
except PromptTooLongError as e:
    err = [type(e).__name__, e.outputs[0].outputs[0].token_ids, sorted(e.rejected)]
s = h.stream({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=200, ignore_eos=True), request_id="long-1")
it = iter(s)
first = next(it)
h.abort("long-1")
rest = list(it)
print(json.dumps({
    "generate": [o.outputs[0].token_ids for o in outs],
    "stream": [t for d in deltas for t in d.outputs[0].token_ids],
    "stream_text": "".join(d.outputs[0].text for d in deltas), "text": outs[0].outputs[0].text,
    "astream": [t for d in adeltas for t in d.outputs[0].token_ids],
    "error": err,
    "aborted": [rest[-1].outputs[0].finish_reason if rest else None,
                len(first.outputs[0].token_ids) + sum(len(d.outputs[0].token_ids) for d in rest)],
    "stats": h.stats(),
}))
"""


def test_connect_from_second_driver_while_http_serves(server, client, tiny_llama_dir):
    http_results = []

    def http_load():
        for p in PROMPTS * 2:
            r = client.completions.create(model=MODEL, prompt=p, max_tokens=4, temperature=0, extra_body=EXTRA)
            http_results.append(r.choices[0].finish_reason)

    t = threading.Thread(target=http_load)
    t.start()
    done = subprocess.run([sys.executable, "-c", SECOND_DRIVER], env=server.env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    t.join(timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    want = [hf_greedy(str(tiny_llama_dir), p, 8)[0] for p in ([5, 6, 7], [11, 12, 13, 14, 15], [21, 22])]
    assert res["generate"] == want[:2]
    assert res["stream"] == want[0] and res["stream_text"] == res["text"]
    assert res["astream"] == want[2]
    assert res["error"] == ["PromptTooLongError", hf_greedy(str(tiny_llama_dir), [5], 8)[0], [1]]
    assert res["aborted"][0] == "abort" and res["aborted"][1] < 200
    assert http_results == ["length"] * 8
    # data parallel: both replicas served requests (Serve spread them), both alive
    replicas = res["stats"]["replicas"]
    assert len(replicas) == 2 and all(r["alive"] for r in replicas.values())
    assert all(r["num_requests"] > 0 for r in replicas.values()), replicas


KILL_A_WORKER = """
import ray
ray.init()
names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith("-rank1")]
ray.kill(ray.get_actor(names[0], namespace=[a for a in ray.util.list_named_actors(all_namespaces=True)
                                             if a["name"] == names[0]][0]["namespace"]))
print(names[0])
"""


@pytest.mark.kills_server_engine
def test_health_is_503_when_an_engine_dies(server, client):
    """Runs last: kills one replica's stage-1 worker; that engine dies and /health says so."""
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    done = subprocess.run([sys.executable, "-c", KILL_A_WORKER], env=server.env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = []
    for _ in range(8):   # requests reach the dead engine (Serve spreads them), which fails them
        try:
            client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=2, temperature=0)
        except openai.APIStatusError as e:
            failures.append((e.status_code, e.body))
    assert failures and all(code == 503 for code, _ in failures), failures
    r = _wait_for(lambda: (r := httpx.get(f"{server.url}/health", timeout=30)).status_code == 503 and r,
                  "/health to report the dead engine", timeout=20)
    assert "died" in r.json()["error"]["message"]
    for _, body in failures:
        no_leak(body.get("error", body))   # the client hands over the inner error object
    assert "restart budget is used up (max_restarts=0" in r.json()["error"]["message"]
