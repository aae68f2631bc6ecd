"""`connect(NAME)`: the Python client handle of a running Shardline application.

    from cluster import connect, SamplingParams
    h = connect("shardline")                       # joins RAY_ADDRESS / address= if Ray is not initialized
    outs = h.generate(["Hello", "Hi"], SamplingParams(max_tokens=8))   # as LLM.generate
    for delta in h.stream("Hello", request_id="r1"):                   # or: async for
        print(delta.outputs[0].text, end="")
    h.abort("r1"); h.stats()

Calls go straight to the engine deployment through a Serve `DeploymentHandle` (Serve routes
each to one of the D replicas); no HTTP. Errors come back as the engine's own exception types
(`PromptTooLongError`, `SamplingParamsError`, `EngineDeadError`, ...), unwrapped from Ray's.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import ray
from ray import serve

from cluster.llm import PromptType
from cluster.ray_connect import connect as connect_ray
from cluster.serve.config import DEFAULT_APP_NAME, ENGINE_DEPLOYMENT, HUB_DEPLOYMENT
from cluster.serve.errors import unwrap
from scheduler import validation
from scheduler.errors import (
    PromptTooLongError,
    SamplingParamsError,
    SamplingParamsTypeError,
    show,
)
from scheduler.request import RequestOutput
from scheduler.sampling_params import SamplingParams


def connect(name: str = DEFAULT_APP_NAME, address: str | None = None) -> ShardlineHandle:
    """A handle on the application `name` of the Ray cluster this driver is (or gets) attached to."""
    connect_ray(address)
    apps = serve.status().applications
    if name not in apps:
        raise LookupError(f"no Shardline application named {name!r} on this Ray cluster "
                          f"(running: {sorted(apps) or 'none'}); start one with `shardline serve --name {name}`")
    return ShardlineHandle(name)


class ShardlineHandle:
    def __init__(self, name: str) -> None:
        self.name = name
        self._engine = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=name)
        self._hub = serve.get_deployment_handle(HUB_DEPLOYMENT, app_name=name)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Every prompt to completion, outputs in input order (the argument forms of `LLM.generate`).

        As `LLM.generate`: rejected prompts do not stop the others; then PromptTooLongError is raised
        with `.outputs` (None for rejected prompts) and `.rejected` ({index: message}).
        """
        items = validation.split_prompts(prompts)   # types here; values: the engine
        params = _params_per_prompt(sampling_params, len(items))
        batch = uuid.uuid4().hex[:12]
        responses = [self._engine.generate_full.remote(_request(text, ids, p, f"{batch}-{i}"))
                     for i, ((text, ids), p) in enumerate(zip(items, params, strict=True))]
        outputs, rejected, first_error = [], {}, None
        for i, response in enumerate(responses):
            try:
                outputs.append(response.result())
            except Exception as exc:   # noqa: BLE001 - collect, then raise like LLM.generate
                exc = unwrap(exc)
                outputs.append(None)
                if isinstance(exc, PromptTooLongError):
                    rejected[i] = str(exc)
                elif first_error is None:
                    first_error = exc
        if first_error is not None:
            raise first_error
        if rejected:
            lines = "; ".join(f"prompt {i}: {msg}" for i, msg in rejected.items())
            err = PromptTooLongError(f"{len(rejected)} of {len(items)} prompts rejected ({lines}); the other "
                                     f"{len(items) - len(rejected)} completed and are in this error's .outputs")
            err.outputs, err.rejected = outputs, rejected
            raise err
        return outputs

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
               request_id: str | None = None) -> Stream:
        """Delta outputs of one prompt as they are produced; iterate with `for` or `async for`."""
        text, ids = validation.split_prompt(prompt)
        sampling_params = _params_per_prompt(sampling_params, 1)[0]
        rid = request_id or uuid.uuid4().hex
        gen = self._engine.options(stream=True).generate.remote(_request(text, ids, sampling_params, rid))
        return Stream(gen)

    def abort(self, request_id: str) -> None:
        """Abort a request started by any client (its stream ends with finish_reason "abort")."""
        # Serve routes a call to one replica, not necessarily the one running the request; the hub
        # hands the abort to the replica that reports this id at its next push (within ~0.25 s)
        self._hub.abort.remote(request_id).result()

    def stats(self) -> dict:
        """Per-replica counts (requests, tokens, running, waiting, KV usage) from the MetricsHub."""
        return self._hub.stats.remote().result()

    def metrics_text(self) -> str:
        return self._hub.metrics_text.remote().result()


class Stream:
    """Sync and async iteration over a Serve response generator, with Shardline's own errors."""

    def __init__(self, gen) -> None:
        self._gen = gen

    def __iter__(self):
        try:
            yield from self._gen
        except ray.exceptions.RayError as exc:
            raise unwrap(exc) from None

    async def __aiter__(self):
        try:
            async for out in self._gen:
                yield out
        except ray.exceptions.RayError as exc:
            raise unwrap(exc) from None

    def cancel(self) -> None:
        """Stop the stream (the engine aborts the request)."""
        self._gen.cancel()


def _request(text: str | None, ids: list[int] | None, params: SamplingParams | None, rid: str) -> dict:
    prompt = {"prompt_token_ids": ids, "prompt": text} if ids is not None else text
    return {"prompt": prompt, "params": params, "request_id": rid}


def _params_per_prompt(sampling_params, n: int) -> list[SamplingParams | None]:
    """None, one SamplingParams / dict of its fields for all, or one per prompt (bounds: the engine's)."""
    def one(p, where: str):
        if p is None or isinstance(p, SamplingParams):
            return p
        if isinstance(p, dict):
            return SamplingParams.from_dict(p)
        raise SamplingParamsTypeError(f"{where}={show(p)} must be a SamplingParams or a dict of its fields, "
                                      f"not {type(p).__name__}", "sampling_params", p)
    if sampling_params is None or isinstance(sampling_params, (SamplingParams, dict)):
        return [one(sampling_params, "sampling_params")] * n
    if not isinstance(sampling_params, (list, tuple)):
        return [one(sampling_params, "sampling_params")] * n
    params = [one(p, f"sampling_params[{i}]") for i, p in enumerate(sampling_params)]
    if len(params) != n:
        raise SamplingParamsError(f"got {len(params)} sampling_params for {n} prompts; give one, or one per "
                                      "prompt", "sampling_params", len(params))
    return params
