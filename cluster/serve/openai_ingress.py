"""`OpenAIIngress`: the HTTP edge (FastAPI through `serve.ingress`), adapting OpenAI's API to the engine.

    GET  /health               200, or 503 when the engine does not answer healthy
    GET  /metrics              Prometheus text from the MetricsHub (every replica)
    GET  /v1/models            the one served model
    POST /v1/completions       text or token-id prompts (one or many); SSE with "stream": true
    POST /v1/chat/completions  the model's chat template; SSE with "stream": true

Every /v1 request is checked in this order: API key (401), body size (413), body (400 naming the
field), model (404), text size (400); engine errors go through `errors.ERROR_TABLE` (a full
engine queue 429, a draining engine or Serve's own back-pressure 503, both with Retry-After).
Streams are primed before the 200 is sent, so a request the engine rejects gets its 400, not a
broken stream. When the client goes away, Serve cancels this handler; the `finally` cancels the
engine call, which aborts the request.
"""

# no `from __future__ import annotations`: FastAPI must see real types (`Request`) in the
# route signatures that `serve.ingress` rewrites
import asyncio
import hmac
import json
import pathlib
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from tokenizers import Tokenizer

from cluster.serve.config import INGRESS_DEPLOYMENT, ServeConfig
from cluster.serve.errors import (
    AuthenticationError,
    ModelNotFoundError,
    RequestTooLargeError,
    error_response,
    retry_after,
)
from cluster.serve.protocol import ChatCompletionRequest, CompletionRequest, _InvalidParam
from scheduler.errors import PromptTooLongError
from scheduler.executor import EngineDeadError
from scheduler.request import RequestOutput
from scheduler.streaming import merge_deltas

HEALTH_TIMEOUT_S = 5.0

app = FastAPI(title="Shardline (OpenAI-compatible)")


async def _merge(streams: list, firsts: list[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several engine streams as their outputs arrive: (prompt index, delta)."""
    for i, first in enumerate(firsts):
        yield i, first
    if len(streams) == 1:
        if not firsts[0].finished:
            async for d in streams[0]:
                yield 0, d
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream, done: bool) -> None:
        try:
            if not done:
                async for d in stream:
                    await queue.put((i, d))
        except Exception as exc:   # noqa: BLE001 - re-raised by the reader
            await queue.put((i, exc))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s, f.finished)) for i, (s, f) in enumerate(zip(streams, firsts))]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class _Formatter:
    """OpenAI response and chunk bodies for one HTTP request (choice index = prompt * n + output)."""

    def __init__(self, rid: str, model: str, body, chat: bool, tokenizer: Tokenizer) -> None:
        self.rid, self.model, self.body, self.chat, self.tokenizer = rid, model, body, chat, tokenizer
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._counted: set[int] = set()

    def _index(self, prompt_index: int, output_index: int) -> int:
        return prompt_index * self.body.n + output_index

    def _count(self, i: int, out: RequestOutput) -> None:
        if i not in self._counted:
            self._counted.add(i)
            self.prompt_tokens += len(out.prompt_token_ids)
        self.completion_tokens += sum(len(c.token_ids) for c in out.outputs)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def _head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def full_response(self, outs: list[RequestOutput]) -> dict:
        choices = []
        for i, out in enumerate(outs):
            self._count(i, out)
            for c in out.outputs:
                choice = {"index": self._index(i, c.index), "finish_reason": c.finish_reason,
                          "logprobs": self._logprobs(c)}
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                else:
                    choice["text"] = c.text
                if out.prompt_logprobs is not None:   # vLLM's layout: None, then {token id: {"logprob", ...}}
                    choice["prompt_logprobs"] = [None if d is None else {str(k): {
                        "logprob": v, "decoded_token": self.tokenizer.decode([k], skip_special_tokens=False)}
                        for k, v in d.items()} for d in out.prompt_logprobs]
                choices.append(choice)
        return {**self._head(self.object), "choices": choices, "usage": self.usage()}

    def role_chunk(self) -> dict:
        choices = [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for k in range(self.body.n)]
        return self._chunk(choices)

    def chunks(self, i: int, delta: RequestOutput) -> list[dict]:
        self._count(i, delta)
        out = []
        for c in delta.outputs:
            if not c.token_ids and not c.text and c.finish_reason is None:
                continue
            choice = {"index": self._index(i, c.index), "logprobs": self._logprobs(c),
                      "finish_reason": c.finish_reason}
            if self.chat:
                choice["delta"] = {"content": c.text}
            else:
                choice["text"] = c.text
            out.append(self._chunk([choice]))
        return out

    def usage_chunk(self) -> dict:
        return {**self._chunk([]), "usage": self.usage()}

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": choices}
        if self.body.include_usage:
            chunk["usage"] = None
        return chunk

    def _logprobs(self, c) -> dict | None:
        if c.logprobs is None:
            return None
        tokens = [self.tokenizer.decode([t], skip_special_tokens=False) for t in c.token_ids]
        if self.chat:
            return {"content": [
                {"token": tok, "logprob": lp[t], "bytes": list(tok.encode()),
                 "top_logprobs": [{"token": self.tokenizer.decode([k], skip_special_tokens=False), "logprob": v,
                                   "bytes": None} for k, v in list(lp.items())[1:]][:self.body.top_logprobs or 0]}
                for tok, t, lp in zip(tokens, c.token_ids, c.logprobs, strict=True)]}
        return {"tokens": tokens, "token_logprobs": [lp[t] for t, lp in zip(c.token_ids, c.logprobs, strict=True)],
                "top_logprobs": [{self.tokenizer.decode([k], skip_special_tokens=False): v for k, v in lp.items()}
                                 for lp in c.logprobs],
                "text_offset": None}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _error(exc: BaseException, status: int | None = None) -> JSONResponse:
    code, body = error_response(exc)
    if status is not None:
        code = body["error"]["code"] = status
    wait = retry_after(exc)
    return JSONResponse(body, status_code=code, headers=None if wait is None else {"Retry-After": str(wait)})


# The deployment class comes last: Serve serializes it when it is decorated, so every module-level
# helper it uses must already exist by then.
@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, engine: DeploymentHandle, hub: DeploymentHandle, config: ServeConfig) -> None:
        self.engine = engine
        self.hub = hub
        self.config = config
        self.model_name = config.model_name
        self.created = int(time.time())
        self.tokenizer = Tokenizer.from_file(str(pathlib.Path(config.model).expanduser() / "tokenizer.json"))

    # -- service endpoints ------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        """200 when an engine replica answers and no replica reported its engine dead; else 503."""
        try:
            await asyncio.wait_for(self.engine.health.remote(), HEALTH_TIMEOUT_S)
            dead = await asyncio.wait_for(self.hub.dead_replicas.remote(), HEALTH_TIMEOUT_S)
            if dead:
                raise EngineDeadError("; ".join(f"replica {r}: {why}" for r, why in dead.items()))
        except Exception as exc:   # noqa: BLE001 - any failure means "not healthy"
            return _error(exc, status=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(self):
        text = await self.hub.metrics_text.remote()
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(self, request: Request):
        try:
            self._authorize(request)
        except AuthenticationError as exc:
            return _error(exc)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "shardline", "root": self.config.model}]}

    # -- generation -------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            body = await self._parse(request, CompletionRequest)
            params = body.sampling_params(body.max_tokens, body.logprobs)
            calls = [{"prompt": p, "params": params} for p in body.prompts()]
            return await self._respond(body, calls, chat=False)
        except Exception as exc:   # noqa: BLE001 - every error goes through the one table
            return _error(exc)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        try:
            body = await self._parse(request, ChatCompletionRequest)
            params = body.sampling_params(body.output_limit, body.num_logprobs)
            calls = [{"messages": [m.model_dump() for m in body.messages], "params": params,
                      "add_generation_prompt": body.add_generation_prompt}]
            return await self._respond(body, calls, chat=True)
        except Exception as exc:   # noqa: BLE001
            return _error(exc)

    async def _parse(self, request: Request, model):
        self._authorize(request)
        raw = await self._read_body(request)
        try:
            data = json.loads(raw)
        except ValueError as exc:   # also bytes that are not UTF-8
            raise _InvalidParam(f"the request body is not JSON: {exc}", None) from None
        try:
            body = model.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise _InvalidParam(f"{param}: {first['msg']}" if param else first["msg"], param) from None
        if body.model != self.model_name:
            raise ModelNotFoundError(f"the model {body.model!r} does not exist; this server serves "
                                     f"{self.model_name!r} (GET /v1/models)")
        self._check_text_size(body)
        return body

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) past max_request_bytes: by its Content-Length first, else while reading."""
        limit = self.config.max_request_bytes
        too_large = RequestTooLargeError(f"the request body is larger than this server's limit of {limit} bytes "
                                         "(max_request_bytes); send fewer or shorter prompts")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise too_large
        return bytes(raw)

    def _check_text_size(self, body) -> None:
        """Text is tokenized before its token count can be checked: bound its length first."""
        limit = self.config.max_prompt_chars
        if isinstance(body, ChatCompletionRequest):
            sizes = [("messages", sum(len(m.content) for m in body.messages))]
        else:
            sizes = [("prompt", len(p)) for p in body.prompts() if isinstance(p, str)]
        for param, size in sizes:
            if size > limit:
                raise PromptTooLongError(f"{param} has {size} characters; this server accepts at most "
                                         f"max_prompt_chars={limit} per prompt", size, limit, param=param)

    def _authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise AuthenticationError("missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    async def _respond(self, body, calls: list[dict], chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        for i, call in enumerate(calls):
            call["request_id"] = f"{rid}-{i}"
            call["check_length"] = True   # prompt + max_tokens must fit (a 400 otherwise, as OpenAI's API)
        streams = [self.engine.options(stream=True).generate.remote(call) for call in calls]
        try:
            firsts = [await s.__anext__() for s in streams]   # raise a rejection here, before the 200
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        fmt = _Formatter(rid, self.model_name, body, chat, self.tokenizer)
        if body.stream:
            return StreamingResponse(self._event_stream(fmt, streams, firsts), media_type="text/event-stream")
        try:
            outs = []
            for stream, first in zip(streams, firsts, strict=True):
                deltas = [first]
                if not first.finished:
                    deltas += [d async for d in stream]
                outs.append(merge_deltas(deltas))
        finally:
            for s in streams:
                s.cancel()
        return JSONResponse(fmt.full_response(outs))

    async def _event_stream(self, fmt: "_Formatter", streams: list, firsts: list[RequestOutput]) -> AsyncIterator[str]:
        try:
            if fmt.chat:
                yield _sse(fmt.role_chunk())
            async for i, delta in _merge(streams, firsts):
                for chunk in fmt.chunks(i, delta):
                    yield _sse(chunk)
            if fmt.body.include_usage:
                yield _sse(fmt.usage_chunk())
            yield "data: [DONE]\n\n"
        except Exception as exc:   # noqa: BLE001 - headers are sent: report in-band, as OpenAI does
            yield _sse(error_response(exc)[1])
        finally:
            for s in streams:
                s.cancel()   # a disconnected client: abort what is still running
