"""`ServeConfig`: everything one Shardline Serve application needs, frozen, validated once."""

from __future__ import annotations

import pathlib
from dataclasses import dataclass, field

ENGINE_DEPLOYMENT = "ShardlineEngine"
INGRESS_DEPLOYMENT = "OpenAIIngress"
HUB_DEPLOYMENT = "MetricsHub"
DEFAULT_APP_NAME = "shardline"


@dataclass(frozen=True)
class ServeConfig:
    """One application: the model, its layout, the HTTP edge's limits and the engine options."""

    model: str
    """Hugging Face model folder (readable at the same path on every node)."""
    served_model_name: str | None = None
    """The `model` name clients send; None: the folder's name."""
    tensor_parallel_size: int = 1
    """Ranks per pipeline stage of one engine (packed on one node)."""
    pipeline_parallel_size: int = 1
    """Stages per engine (may spread over nodes)."""
    data_parallel_size: int = 1
    """Engines, one per Serve replica, routed by Serve."""
    api_key: str | None = None
    """If set, /v1/* requests need `Authorization: Bearer <api_key>`."""
    max_ongoing_requests: int = 256
    """Requests one ingress replica (and one engine replica) serves at once."""
    max_queued_requests: int = 64
    """Requests waiting beyond that before Serve answers 503 (bounded queue)."""
    drain_timeout_s: float = 30.0
    """On shutdown (SIGTERM, `shardline stop`, a replica Serve removes): seconds in-flight requests get to
    finish while new ones are refused (503 + Retry-After); the rest end with finish_reason "abort"."""
    max_request_bytes: int = 2 * 1024 * 1024
    """Largest request body accepted; a larger one is answered 413 before it is parsed."""
    max_prompt_chars: int = 256 * 1024
    """Longest text prompt (or chat, all messages together) in characters, checked before tokenizing (400)."""
    cpus_per_worker: float | None = None
    """CPUs each worker reserves; None: the cluster's CPUs shared by every worker (at most 1)."""
    engine_kwargs: dict = field(default_factory=dict)
    """More `LLM(...)` keywords (max_model_len, num_kv_blocks, dtype, ...)."""

    def __post_init__(self) -> None:
        path = pathlib.Path(self.model).expanduser()
        if not (path / "config.json").is_file():
            raise ValueError(f"model={self.model!r} is not a Hugging Face model folder (no config.json); "
                             "give the folder of config.json + *.safetensors + tokenizer.json")
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
                     "max_ongoing_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not isinstance(self.max_queued_requests, int) or self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests={self.max_queued_requests!r} must be an integer >= 0")
        for name in ("max_request_bytes", "max_prompt_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        drain = self.drain_timeout_s
        if isinstance(drain, bool) or not isinstance(drain, (int, float)) or not 0 <= drain < float("inf"):
            raise ValueError(f"drain_timeout_s={drain!r} must be a finite number of seconds >= 0 (0: abort at once)")

    @property
    def model_name(self) -> str:
        return self.served_model_name or pathlib.Path(self.model).expanduser().resolve().name

    @property
    def num_workers(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size
