"""`ShardlineEngine`: the Serve deployment whose replica owns one Shardline engine (vLLM's `LLMServer`).

The replica's placement group (set by `builder.build_app`) is

    bundle 0        the replica itself (a sliver of CPU: it only schedules)
    bundles 1..T*P  one per worker, in (stage, tp rank) order

so the `RayExecutor` places its `ShardWorker`s into bundles 1.. of the group Serve reserved
(`ExistingGroup`), and Serve removes the group, with the workers, when the replica goes. The
deployment adapts, it does not decide: requests go to `AsyncLLMEngine`, whose step loop is the
same `LLMEngine` the offline `LLM` runs. A pusher thread sends this replica's metrics snapshot to
the application's `MetricsHub` every PUSH_PERIOD_S and receives the aborts addressed to it.

Graceful shutdown, two ways in: `shardline serve` on SIGTERM asks the hub to drain, and every
replica drains at its next push (`AsyncLLMEngine.drain`: refuse new requests with 503, give the
running ones ServeConfig.drain_timeout_s, abort the rest); when Serve itself removes a replica
(`shardline stop`, a scale-down) it first waits up to graceful_shutdown_timeout_s (set to the
same drain timeout by the builder) for ongoing calls, and `__del__` aborts whatever is left.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator

import ray
from ray import serve

from cluster.llm import LLM
from cluster.ray_workers import ExistingGroup
from cluster.serve.config import HUB_DEPLOYMENT, ServeConfig
from scheduler.async_engine import AsyncLLMEngine
from scheduler.errors import PromptTooLongError
from scheduler.executor import EngineDeadError
from scheduler.request import RequestOutput
from scheduler.sampling_params import SamplingParams
from scheduler.streaming import merge_deltas

logger = logging.getLogger(__name__)

PUSH_PERIOD_S = 0.25


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=10)
class ShardlineEngine:
    def __init__(self, config: ServeConfig, app_name: str, cpus_per_worker: float) -> None:
        group = ray.util.get_current_placement_group()
        if group is None:
            raise RuntimeError("ShardlineEngine must run in its placement group (use cluster.serve.build_app)")
        self.config = config
        self.llm = LLM(config.model, tensor_parallel_size=config.tensor_parallel_size,
                       pipeline_parallel_size=config.pipeline_parallel_size, placement=ExistingGroup(group),
                       cpus_per_worker=cpus_per_worker, **config.engine_kwargs)
        self.engine = AsyncLLMEngine(self.llm.engine)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._hub = serve.get_deployment_handle(HUB_DEPLOYMENT, app_name)
        self._stop = threading.Event()
        self._drain: threading.Thread | None = None
        self.drained: dict | None = None
        self._pusher = threading.Thread(target=self._push_loop, name="shardline-metrics-push", daemon=True)
        self._pusher.start()

    # -- requests --------------------------------------------------------------------------

    async def generate(self, request: dict) -> AsyncIterator[RequestOutput]:
        """Stream delta outputs of one request: {"prompt" | "messages", "params", "request_id"}.

        Cancelling the caller (a closed HTTP stream, `gen.cancel()`) cancels this generator, and
        the engine aborts the request and frees its blocks.
        """
        prompt, text = self._prompt(request)
        params = request.get("params") or SamplingParams()
        if request.get("check_length"):
            self._check_room(prompt, params)
        async for out in self.engine.generate(prompt, params, request["request_id"], prompt_text=text):
            yield out

    async def generate_full(self, request: dict) -> RequestOutput:
        """The whole output of one request (what `LLM.generate` returns for it)."""
        return merge_deltas([out async for out in self.generate(request)])

    def _prompt(self, request: dict) -> tuple[str | list[int], str | None]:
        if "messages" in request:
            tok = self.llm.get_tokenizer()
            text = tok.apply_chat_template(request["messages"], tokenize=False,
                                           add_generation_prompt=request.get("add_generation_prompt", True))
            return self.llm.tokenizer.encode(text, add_special_tokens=False).ids, text
        prompt = request["prompt"]
        return prompt, None   # text, token ids or a {"prompt_token_ids", "prompt"} dict: the engine validates it

    def _check_room(self, prompt, params: SamplingParams) -> None:
        """The HTTP edge, as OpenAI's and vLLM's servers: prompt + max_tokens must fit max_model_len (the
        Python API instead ends such an output with "length" at the limit, as vLLM's `LLM` does)."""
        if params.max_tokens is None or not isinstance(params.max_tokens, int):
            return
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt_token_ids") or prompt.get("prompt")
        try:
            n = len(self.llm.tokenizer.encode(prompt).ids) if isinstance(prompt, str) else len(prompt)
        except Exception:   # noqa: BLE001 - not a valid prompt: the engine names what is wrong with it
            return
        limit = self.llm.engine.max_model_len
        if n < limit < n + params.max_tokens:
            raise PromptTooLongError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = "
                                     f"{n + params.max_tokens} exceeds max_model_len={limit}; ask for at most "
                                     f"max_tokens={limit - n}", n, limit, param="max_tokens")

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    # -- health and metrics ------------------------------------------------------------------

    def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica. A worker failure the
        executor recovered from (within `max_restarts`) keeps the replica healthy; past the budget the
        engine is dead and this raises."""
        if self.engine.dead is not None:
            raise EngineDeadError(self.engine.dead)

    def health(self) -> dict:
        self.check_health()
        return {"replica": self.replica_id, "ok": True, "restarts": len(self.llm.engine.recoveries)}

    def stats(self) -> dict:
        return {"replica": self.replica_id, **self._snapshot()}

    def _snapshot(self) -> dict:
        snap = self.engine.snapshot()
        snap["request_ids"] = self.engine.request_ids
        snap["drained"] = self.drained
        return snap

    def _push_loop(self) -> None:
        while not self._stop.wait(PUSH_PERIOD_S):
            try:
                reply = self._hub.push.remote(self.replica_id, self._snapshot()).result(timeout_s=10)
            except Exception as exc:   # noqa: BLE001 - the hub may be restarting; try again next period
                logger.debug("metrics push failed: %s", exc)
                continue
            for rid in reply["aborts"]:
                self.engine.abort(rid)
            if reply["drain_s"] is not None and self._drain is None:
                self._drain = threading.Thread(target=self._run_drain, args=(reply["drain_s"],),
                                               name="shardline-drain", daemon=True)
                self._drain.start()

    def _run_drain(self, timeout_s: float) -> None:
        self.drained = self.engine.drain(timeout_s)
        logger.info("drained: %s", self.drained)

    def __del__(self) -> None:
        """Serve calls this when the replica stops: stop the loop, release the workers."""
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        engine = getattr(self, "engine", None)
        if engine is not None and engine.dead is None:
            try:   # Serve already waited for ongoing calls: abort what is left so its streams end cleanly
                engine.drain(0)
            except Exception:   # noqa: BLE001 - shutting down regardless
                logger.debug("final drain failed", exc_info=True)
        for name in ("engine", "llm"):
            obj = getattr(self, name, None)
            if obj is not None:
                try:
                    obj.shutdown()
                except Exception:   # noqa: BLE001 - shutting down regardless
                    logger.debug("shutdown of %s failed", name, exc_info=True)


