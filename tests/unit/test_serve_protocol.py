"""The HTTP edge without processes: request parsing, the one error table, metrics aggregation."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from cluster.serve.config import ServeConfig
from cluster.serve.errors import (
    AuthenticationError,
    ModelNotFoundError,
    RequestTooLargeError,
    error_response,
    public_message,
    retry_after,
)
from cluster.serve.metrics_hub import _Collector
from cluster.serve.protocol import ChatCompletionRequest, CompletionRequest
from scheduler.engine import PromptTooLongError
from scheduler.errors import EngineDrainingError, QueueFullError
from scheduler.executor import EngineDeadError
from scheduler.metrics import EngineMetrics
from scheduler.request import CompletionOutput, RequestOutput
from scheduler.sampling_params import SamplingParamsError


def test_unknown_fields_are_rejected_not_ignored():
    with pytest.raises(ValidationError, match="frobnicate"):
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", "frobnicate": 1})
    with pytest.raises(ValidationError, match="name"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x",
                                                                          "name": "bob"}]})


def test_request_fields_become_sampling_params():
    body = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]], "max_tokens": 5, "top_k": 3,
                                             "stop": ["\n"], "logprobs": 2})
    assert body.prompts() == [[1, 2], [3]]
    p = body.sampling_params(body.max_tokens, body.logprobs)
    assert (p.max_tokens, p.top_k, p.stop_strings, p.logprobs) == (5, 3, ["\n"], 2)
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 2})
    assert (chat.output_limit, chat.num_logprobs) == (7, 2)


@pytest.mark.parametrize("exc, status, param", [
    (SamplingParamsError("temperature=-1 is out of range; allowed: >= 0"), 400, "temperature"),
    (PromptTooLongError("prompt has 300 tokens but max_model_len is 256"), 400, "prompt"),
    (TypeError("bad type"), 400, None),
    (ModelNotFoundError("the model 'x' does not exist"), 404, "model"),
    (AuthenticationError("missing key"), 401, None),
    (EngineDeadError("rank 1 died"), 503, None),
    (QueueFullError("the engine's queue is full"), 429, None),
    (EngineDrainingError("the engine is shutting down"), 503, None),
    (RequestTooLargeError("the request body is larger than 100 bytes"), 413, None),
])
def test_one_table_maps_errors_to_openai_bodies(exc, status, param):
    code, body = error_response(exc)
    assert code == status == body["error"]["code"]
    assert body["error"]["param"] == param and body["error"]["message"] == str(exc)


def test_retryable_errors_carry_retry_after_and_others_do_not():
    from ray.serve.exceptions import BackPressureError

    assert retry_after(QueueFullError("full", retry_after_s=0.2)) == 1      # whole seconds, at least 1
    assert retry_after(EngineDrainingError("draining", retry_after_s=5)) == 5
    assert retry_after(BackPressureError(num_queued_requests=3, max_queued_requests=2)) == 1
    assert error_response(BackPressureError(num_queued_requests=3, max_queued_requests=2))[0] == 503
    for exc in (ValueError("x"), EngineDeadError("dead"), RuntimeError("boom")):
        assert retry_after(exc) is None
    assert not isinstance(QueueFullError("x"), ValueError)   # retryable: never mapped to a 400


def test_no_traceback_or_server_path_reaches_an_error_body(tmp_path):
    """An unexpected error (a bug) is named by type only; a 5xx message loses tracebacks and paths."""
    where = tmp_path / "secret_dir" / "engine.py"
    tb = f'Traceback (most recent call last):\n  File "{where}", line 3, in step\nKeyError: 7'
    code, body = error_response(RuntimeError(f"step failed at {where}\n{tb}"))
    msg = body["error"]["message"]
    assert code == 500 and "RuntimeError" in msg
    assert str(tmp_path) not in msg and "Traceback" not in msg and "engine.py" not in msg
    code, body = error_response(EngineDeadError(f"rank 1 (pid 7) died loading {where}\n{tb}"))
    msg = body["error"]["message"]
    assert code == 503 and msg.startswith("rank 1 (pid 7) died loading") and str(tmp_path) not in msg
    assert "<path>" in msg and "Traceback" not in msg
    # URL paths and ordinary text are left alone
    assert public_message("see /v1/models and 3/4 of it") == "see /v1/models and 3/4 of it"


@pytest.mark.parametrize("field, bad", [("drain_timeout_s", -1), ("drain_timeout_s", float("inf")),
                                        ("drain_timeout_s", True), ("max_request_bytes", 0),
                                        ("max_prompt_chars", "10")])
def test_serve_config_rejects_bad_limits(tiny_llama_dir, field, bad):
    with pytest.raises(ValueError, match=field):
        ServeConfig(model=str(tiny_llama_dir), **{field: bad})


def test_timeout_is_a_request_field_checked_like_the_others():
    body = CompletionRequest.model_validate({"model": "m", "prompt": "x", "timeout": 2.5})
    assert body.sampling_params(body.max_tokens, None).timeout == 2.5
    bad = CompletionRequest.model_validate({"model": "m", "prompt": "x", "timeout": -1})
    with pytest.raises(SamplingParamsError, match="timeout=-1"):
        bad.sampling_params(bad.max_tokens, None)
    with pytest.raises(ValidationError, match="timeout"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "timeout": "soon"})


def test_server_binds_to_loopback_by_default():
    import argparse

    from cluster.serve_cli import add_serve, http_target

    sub = argparse.ArgumentParser().add_subparsers()
    add_serve(sub)
    args = sub.choices["serve"].parse_args([])
    assert http_target(args.host, args.port, running=None) == ("127.0.0.1", 8000)
    assert (args.drain_timeout, args.max_waiting_requests) == (30.0, 128)


def test_another_port_than_the_running_serve_proxy_is_refused_naming_it():
    from cluster.serve_cli import http_target

    assert http_target(None, None, running=("127.0.0.1", 8123)) == ("127.0.0.1", 8123)
    assert http_target("127.0.0.1", 8123, running=("127.0.0.1", 8123)) == ("127.0.0.1", 8123)
    with pytest.raises(ValueError, match=r"--port 9000: Ray Serve already runs .* 127\.0\.0\.1:8123.*--port 8123"):
        http_target(None, 9000, running=("127.0.0.1", 8123))
    with pytest.raises(ValueError, match=r"--host 0\.0\.0\.0: .*pass --host 127\.0\.0\.1"):
        http_target("0.0.0.0", None, running=("127.0.0.1", 8123))


def test_an_error_with_param_names_it():
    class InvalidRequestError(ValueError):   # the shape of scheduler.errors.InvalidRequestError
        param = "messages"

    assert error_response(InvalidRequestError("no messages"))[1]["error"]["param"] == "messages"


def _snapshot(tokens: int, reason: str) -> dict:
    m = EngineMetrics()
    m.started("r", now=0.0)
    out = RequestOutput("r", None, [1, 2, 3], [CompletionOutput(0, "ab", list(range(tokens)), 0.0, None, reason)],
                        True)
    m.observe(out, now=0.5)

    class _Engine:   # what snapshot() reads
        schedulers = []
        recoveries = []

        @staticmethod
        def all_blocks_free():
            return True

    return m.snapshot(_Engine)


def test_metrics_sum_over_replicas_in_prometheus_text():
    from prometheus_client import CollectorRegistry, generate_latest

    replicas = {"a": (1e18, _snapshot(4, "length")), "b": (1e18, _snapshot(2, "stop"))}
    registry = CollectorRegistry()
    registry.register(_Collector("m", replicas))
    samples = {(s.name, s.labels.get("finished_reason"), s.labels.get("le")): s.value
               for fam in text_string_to_metric_families(generate_latest(registry).decode()) for s in fam.samples}
    assert samples[("shardline:generation_tokens_total", None, None)] == 6
    assert samples[("shardline:prompt_tokens_total", None, None)] == 6
    assert samples[("shardline:request_success_total", "length", None)] == 1
    assert samples[("shardline:request_success_total", "stop", None)] == 1
    assert samples[("shardline:e2e_request_latency_seconds_count", None, None)] == 2
    assert samples[("shardline:e2e_request_latency_seconds_bucket", None, "0.5")] == 2


def test_builder_docstring_examples_hold():
    """The engine replica's placement group: its own bundle, then one per worker (run, not just read)."""
    import doctest

    import cluster.serve.builder

    result = doctest.testmod(cluster.serve.builder, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
