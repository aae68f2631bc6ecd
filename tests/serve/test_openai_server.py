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
from tests.serve.test_drain import LONG, stream_completion

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.timeout(600)]

MODEL = "tiny-llama"                       # --served-model-name
PROMPTS = [[5, 6, 7], [11, 12, 13, 14, 15], [21, 22], [40, 41, 42, 43]]
MAX_TOKENS = 8
EXTRA = {"ignore_eos": True}               # the random model emits EOS early; compare full lengths
MAX_BODY, MAX_CHARS = 100_000, 4_000


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    args = [str(tiny_llama_dir), "--served-model-name", MODEL,
            "--pipeline-parallel-size", "2", "--data-parallel-size", "2", "--name", "t",
            "--api-key", API_KEY, "--max-ongoing-requests", "100", "--max-queued-requests", "20",
            "--max-num-seqs", "8", "--max-waiting-requests", "32", "--max-request-bytes", str(MAX_BODY),
            "--max-prompt-chars", str(MAX_CHARS), "--drain-timeout", "0",
            "--max-restarts", "0"]   # fail-stop: the last test kills a worker to see a dead engine
    with shardline_serve(args) as srv:
        yield srv
        late = _in_flight_stream(srv)
    # SIGTERM with --drain-timeout 0: the stream in flight ended with finish_reason "abort"; the command
    # deleted its application and stopped its Ray, and exited 0
    late.join(timeout=120)
    assert late.result["status"] == 200 and late.result["reason"] == "abort", late.result
    assert late.result["tokens"] < LONG
    assert srv.exit_code == 0 and "stopped t" in srv.final_log, srv.final_log[-3000:]
    assert "drained t: 0 finished, 1 aborted" in srv.final_log, srv.final_log[-3000:]


def _in_flight_stream(srv) -> threading.Thread:
    """A long stream that has started (retried past a replica the last test killed), left running."""
    for _ in range(20):
        started, result = threading.Event(), {}
        t = threading.Thread(target=stream_completion, args=(srv.url, [5, 6], started, result))
        t.result = result
        t.start()
        if started.wait(60) and result.get("status") == 200:
            return t
        t.join(timeout=60)
    raise AssertionError(f"no stream could start: {result}")


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


def _settled_metrics(server) -> dict:
    """Metrics once the replicas' pushes (every 0.25 s) have caught up: two readings 1 s apart agree."""
    last = _metrics(server)
    for _ in range(30):
        time.sleep(1.0)
        now = _metrics(server)
        if now == last:
            return now
        last = now
    raise AssertionError("the metrics never settled")


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


def test_overload_answers_429_or_503_with_retry_after_and_loses_nothing(server):
    """A burst of 150 against 100 ongoing + 20 queued at the ingress and, per engine replica, 8 running +
    32 waiting: the engines' bounded queues answer 429, Serve's queue 503, both with Retry-After; every
    request gets one of 200 / 429 / 503, and every 200 is a complete output."""
    body = {"model": MODEL, "prompt": [5, 6], "max_tokens": 32, "temperature": 0, "ignore_eos": True}

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
            assert r.json()["usage"]["completion_tokens"] == 32
        else:   # ours (JSON) or Serve's proxy (text, for its own queue): both say when to retry
            assert int(r.headers["retry-after"]) >= 1, (r.status_code, r.headers, r.text)
            if r.headers["content-type"].startswith("application/json"):
                err = r.json()["error"]
                assert err["code"] == r.status_code and err["message"]
            else:
                assert r.status_code == 503 and "queue" in r.text.lower(), r.text
    queue_full = next(r for r in rs if r.status_code == 429).json()["error"]
    assert queue_full["type"] == "rate_limit_error" and "max_waiting_requests" in queue_full["message"]


def _no_leak(err: dict) -> None:
    """An error body names the problem and shows nothing of the server: no traceback, no file path."""
    text = json.dumps(err)
    assert err["message"] and "Traceback" not in text and ".py" not in text
    assert not any(root in text for root in ("/home/", "/tmp/", "/work/", "/root/", "/usr/")), text


def test_bad_input_wall_over_http_uses_no_engine_step(server, client):
    """Issue 12 test 1 over HTTP: each bad request gets a 4xx naming the problem, costs no engine step
    (the token counters do not move), and the server serves afterwards."""
    url, auth = f"{server.url}/v1/completions", {"Authorization": f"Bearer {API_KEY}"}
    chat_url = f"{server.url}/v1/chat/completions"
    ok = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    msgs = [{"role": "user", "content": "hi"}]
    raw = {"content-type": "application/json", **auth}
    cases = [   # (id, request kwargs for httpx, status, param or None, text in the message)
        ("malformed_json", dict(url=url, content=b'{"model": ', headers=raw), 400, None, "not JSON"),
        ("invalid_utf8", dict(url=url, content=b'{"model": "\xff\xfe"}', headers=raw), 400, None, "not JSON"),
        ("body_not_object", dict(url=url, json=[ok]), 400, None, "valid dictionary"),
        ("lone_surrogate", dict(url=url, content=b'{"model": "tiny-llama", "prompt": "a\\ud800b"}', headers=raw),
         400, "prompt", "surrogate"),
        ("empty_text", dict(url=url, json={**ok, "prompt": ""}), 400, "prompt", "empty"),
        ("empty_list", dict(url=url, json={**ok, "prompt": []}), 400, "prompt", "empty"),
        ("id_past_vocab", dict(url=url, json={**ok, "prompt": [5, 10**6]}), 400, "prompt_token_ids", "vocabulary"),
        ("id_negative", dict(url=url, json={**ok, "prompt": [-3]}), 400, "prompt_token_ids", "vocabulary"),
        ("prompt_at_max_len", dict(url=url, json={**ok, "prompt": [5] * 256}), 400, None, "max_model_len"),
        ("prompt_plus_max_tokens", dict(url=url, json={**ok, "prompt": [5] * 200, "max_tokens": 100}), 400,
         "max_tokens", "at most max_tokens=56"),
        ("chat_plus_max_tokens", dict(url=chat_url, json={"model": MODEL, "messages": msgs, "max_tokens": 10**4}),
         400, "max_tokens", "exceeds max_model_len=256"),
        ("n_huge", dict(url=url, json={**ok, "n": 10**6}), 400, "n", "max_n"),
        ("logprobs_21", dict(url=url, json={**ok, "logprobs": 21}), 400, "logprobs", "20"),
        ("top_k_float", dict(url=url, json={**ok, "top_k": 2.5}), 400, "top_k", "integer"),
        ("stop_token_past_vocab", dict(url=url, json={**ok, "stop_token_ids": [10**6]}), 400, "stop_token_ids",
         "stop_token_ids"),
        ("timeout_negative", dict(url=url, json={**ok, "timeout": -1}), 400, "timeout", "timeout=-1"),
        ("echo_true", dict(url=url, json={**ok, "echo": True}), 400, "echo", "echo"),
        ("text_too_long", dict(url=url, json={**ok, "prompt": "a" * (MAX_CHARS + 1)}), 400, "prompt",
         "max_prompt_chars"),
        ("chat_too_long", dict(url=chat_url, json={"model": MODEL, "messages": [
            {"role": "user", "content": "a" * (MAX_CHARS // 2 + 1)}] * 2}), 400, "messages", "max_prompt_chars"),
        ("chat_no_messages", dict(url=chat_url, json={"model": MODEL, "messages": []}), 400, "messages", "messages"),
        ("chat_bad_role", dict(url=chat_url, json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}),
         400, "messages.0.role", "role"),
        ("chat_top_logprobs_alone", dict(url=chat_url, json={"model": MODEL, "messages": msgs, "top_logprobs": 2}),
         400, "top_logprobs", "logprobs"),
        ("body_too_large", dict(url=url, json={**ok, "prompt": "a" * MAX_BODY}), 413, None, "max_request_bytes"),
        ("chunked_too_large", dict(url=url, content=iter([b'{"model": "', b"a" * MAX_BODY, b'"}']), headers=raw),
         413, None, "max_request_bytes"),
        ("unknown_model", dict(url=url, json={**ok, "model": "tiny-lama"}), 404, "model", MODEL),
    ]
    before = _settled_metrics(server)
    for name, kw, status, param, text in cases:
        r = httpx.post(**{"headers": auth, **kw}, timeout=60)
        err = r.json()["error"]
        assert (r.status_code, err["code"]) == (status, status), (name, r.status_code, err)
        assert param is None or err["param"] == param, (name, err)
        assert text in err["message"], (name, err)
        _no_leak(err)
    after = _settled_metrics(server)
    for key in ("shardline:prompt_tokens_total", "shardline:generation_tokens_total"):
        assert after[key] == before[key], f"a rejected request used an engine step ({key})"
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, temperature=0, extra_body=EXTRA)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3


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
    for _, body in failures:
        _no_leak(body.get("error", body))   # the client hands over the inner error object
    assert "restart budget is used up (max_restarts=0" in r.json()["error"]["message"]
