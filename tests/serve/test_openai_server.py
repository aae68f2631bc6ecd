"""`shardline serve` at PP=2 x DP=2 on the tiny Llama, through the official `openai` client and raw HTTP.

One server for the module (its start-up is the expensive part); the tests share it, and the one
that kills an engine worker runs last. Greedy outputs are compared with `transformers`.
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
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from tests.fixtures.reference import hf_greedy, hf_prefill_logits
from tests.serve.conftest import API_KEY, REPO, shardline_serve

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.timeout(600)]

MODEL = "tiny-llama"                       # --served-model-name
PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15], [21, 22], [40, 41, 42, 43]]
MAX_TOKENS = 8
EXTRA = {"ignore_eos": True}               # the random model emits EOS early; compare full lengths


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    args = [str(tiny_llama_dir), "--served-model-name", MODEL,
            "--pipeline-parallel-size", "2", "--data-parallel-size", "2", "--name", "t",
            "--api-key", API_KEY, "--max-ongoing-requests", "40", "--max-queued-requests", "40"]
    with shardline_serve(args) as srv:
        yield srv
    # SIGTERM: the command deleted its application and stopped its Ray, and exited 0
    assert srv.exit_code == 0 and "stopped t" in srv.final_log, srv.final_log[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_tok(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def _metrics(server) -> dict:
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + ("" if "finished_reason" not in s.labels else f"[{s.labels['finished_reason']}]")
            if "le" not in s.labels:
                out[key] = s.value
    return out


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
    before = _metrics(server).get("shardline:request_success_total[abort]", 0)
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # the client is gone: the request is aborted, nothing runs, every replica's KV cache is free
    m = _wait_for(lambda: (m := _metrics(server)).get("shardline:request_success_total[abort]", 0) > before and m,
                  "the abort to be counted")
    m = _wait_for(lambda: (m := _metrics(server))["shardline:num_requests_running"] == 0
                  and m["shardline:kv_cache_usage_perc"] == 0 and m, "blocks to be freed")
    assert m["shardline:num_requests_waiting"] == 0


def test_error_bodies_name_the_problem(server):
    url, auth = f"{server.url}/v1/completions", {"Authorization": f"Bearer {API_KEY}"}
    ok = {"model": MODEL, "prompt": "hi", "max_tokens": 2}

    def post(body, headers=auth):
        r = httpx.post(url, json=body, headers=headers, timeout=60)
        return r.status_code, r.json()["error"]

    code, err = post({**ok, "temperature": -1})
    assert code == 400 and err["param"] == "temperature" and "temperature=-1" in err["message"]
    assert err["type"] == "invalid_request_error"
    code, err = post({**ok, "frobnicate": 1})                  # unknown fields are errors, not ignored
    assert code == 400 and err["param"] == "frobnicate"
    code, err = post({**ok, "max_tokens": "many"})
    assert code == 400 and err["param"] == "max_tokens"
    code, err = post({**ok, "prompt": list(range(5, 305))})    # 300 tokens > max_model_len 256
    assert code == 400 and "max_model_len" in err["message"]
    code, err = post({**ok, "model": "gpt-4"})
    assert code == 404 and err["param"] == "model" and MODEL in err["message"]
    code, err = post(ok, headers={})
    assert code == 401 and err["type"] == "authentication_error"
    code, err = post(ok, headers={"Authorization": "Bearer wrong"})
    assert code == 401
    with pytest.raises(openai.BadRequestError) as e:   # and through the client: its own typed errors
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0).completions.create(
            model=MODEL, prompt="hi", top_p=0)
    assert e.value.body["param"] == "top_p"


def test_overload_answers_503(server):
    """40 ongoing + 40 queued at the one ingress replica: a burst of 150 requests must overflow."""
    body = {"model": MODEL, "prompt": [5, 6], "max_tokens": 32, "temperature": 0, "ignore_eos": True}

    async def main():
        async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            rs = await asyncio.gather(*(c.post(f"{server.url}/v1/completions", json=body) for _ in range(150)))
        return [r.status_code for r in rs]

    codes = asyncio.run(main())
    assert set(codes) == {200, 503}, codes
    assert codes.count(200) >= 40


def test_metrics_parse_and_counters_move(server, client):
    before = _metrics(server)
    client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=4, temperature=0, extra_body=EXTRA)
    after = _wait_for(lambda: (m := _metrics(server))["shardline:generation_tokens_total"]
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
