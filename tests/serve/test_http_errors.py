"""HTTP errors of the shared `shardline serve` (tests/serve/conftest.py's PP=2 x DP=2 `server`).

Every bad request gets the status and OpenAI error body that name the problem (the parameter,
what to change), shows nothing of the server, and costs no engine step.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.serve.conftest import API_KEY, EXTRA, MAX_BODY, MAX_CHARS, MODEL, no_leak, settled_metrics

pytestmark = [pytest.mark.e2e, pytest.mark.ray, pytest.mark.timeout(600)]


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
    before = settled_metrics(server)
    for name, kw, status, param, text in cases:
        r = httpx.post(**{"headers": auth, **kw}, timeout=60)
        err = r.json()["error"]
        assert (r.status_code, err["code"]) == (status, status), (name, r.status_code, err)
        assert param is None or err["param"] == param, (name, err)
        assert text in err["message"], (name, err)
        no_leak(err)
    after = settled_metrics(server)
    for key in ("shardline:prompt_tokens_total", "shardline:generation_tokens_total"):
        assert after[key] == before[key], f"a rejected request used an engine step ({key})"
    out = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, temperature=0, extra_body=EXTRA)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
