"""Where processes live and how they talk: executors, the client handle, Ray plumbing."""

from cluster.llm import LLM
from scheduler.beam_search import BeamSearchOutput, BeamSearchParams
from scheduler.errors import InvalidRequestError, PromptTooLongError, UnknownArgumentError
from scheduler.executor import EngineDeadError
from scheduler.request import CompletionOutput, RequestOutput
from scheduler.sampling_params import SamplingParams

__all__ = ["LLM", "BeamSearchOutput", "BeamSearchParams", "CompletionOutput", "EngineDeadError",
           "InvalidRequestError", "PromptTooLongError", "RequestOutput", "SamplingParams", "UnknownArgumentError"]
