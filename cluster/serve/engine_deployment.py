"""`ShardlineEngine`: the Serve deployment whose replica owns one Shardline engine (vLLM's `LLMServer`).

The replica's placement group (set by `builder.build_app`) is

    bundle 0        the replica itself (a sliver of CPU: it only schedules)
    bundles 1..T*P  one per worker, in (stage, tp rank) order

so the `RayExecutor` places its `ShardWorker`s into bundles 1.. of the group Serve reserved
(`ExistingGroup`), and Serve removes the group, with the workers, when the replica goes. The
deployment adapts, it does not decide: requests go to `AsyncLLMEngine`, whose step loop is the
same `LLMEngine` the offline `LLM` runs. A pusher thread sends this replica's metrics snapshot to
the application's `MetricsHub` every PUSH_PERIOD_S and receives the aborts addressed to it.
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
        return snap

    def _push_loop(self) -> None:
        while not self._stop.wait(PUSH_PERIOD_S):
            try:
                aborts = self._hub.push.remote(self.replica_id, self._snapshot()).result(timeout_s=10)
            except Exception as exc:   # noqa: BLE001 - the hub may be restarting; try again next period
                logger.debug("metrics push failed: %s", exc)
                continue
            for rid in aborts:
                self.engine.abort(rid)

    def __del__(self) -> None:
        """Serve calls this when the replica stops: stop the loop, release the workers."""
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        for name in ("engine", "llm"):
            obj = getattr(self, name, None)
            if obj is not None:
                try:
                    obj.shutdown()
                except Exception:   # noqa: BLE001 - shutting down regardless
                    logger.debug("shutdown of %s failed", name, exc_info=True)


