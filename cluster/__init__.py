"""Where processes live and how they talk: executors, the client handle, Ray plumbing."""

from cluster.llm import LLM
from scheduler.beam_search import BeamSearchOutput, BeamSearchParams
from scheduler.errors import (
    EngineDrainingError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    UnknownArgumentError,
)
from scheduler.executor import EngineDeadError
from scheduler.request import CompletionOutput, RequestOutput
from scheduler.sampling_params import SamplingParams


def connect(name: str = "shardline", address: str | None = None):
    """The client handle of a running `shardline serve` application (see `cluster.serve.client`).

    Imported lazily: Ray Serve and FastAPI load only when a handle is asked for.
    """
    from cluster.serve.client import connect as _connect

    return _connect(name, address)


__all__ = ["LLM", "connect", "BeamSearchOutput", "BeamSearchParams", "CompletionOutput", "EngineDeadError",
           "InvalidRequestError", "PromptTooLongError", "RequestOutput", "SamplingParams", "UnknownArgumentError",
           "QueueFullError", "EngineDrainingError"]
