"""What runs next, in plain Python (msgpack and tokenizers only; never torch or ray)."""

from scheduler.beam_search import BeamSearchOutput, BeamSearchParams, BeamSearchSequence, beam_search
from scheduler.block_manager import BlockError, BlockManager
from scheduler.config import ConfigError, EngineConfig
from scheduler.detokenizer import IncrementalDetokenizer
from scheduler.engine import LLMEngine
from scheduler.errors import (
    ConfigTypeError,
    EngineDrainingError,
    InvalidRequestError,
    InvalidTypeError,
    PromptError,
    PromptTooLongError,
    PromptTypeError,
    QueueFullError,
    RetryableError,
    SamplingParamsTypeError,
    UnknownArgumentError,
)
from scheduler.executor import EngineDeadError, Executor
from scheduler.request import CompletionOutput, Request, RequestOutput, Sequence, SequenceStatus
from scheduler.sampling_params import SamplingParams, SamplingParamsError
from scheduler.scheduler import MicroBatch, Scheduler, SchedulerOutput

__all__ = [
    "ConfigTypeError", "InvalidRequestError", "InvalidTypeError", "PromptError", "PromptTypeError",
    "SamplingParamsTypeError", "UnknownArgumentError", "QueueFullError", "EngineDrainingError", "RetryableError",
    "BeamSearchOutput", "BeamSearchParams", "BeamSearchSequence", "BlockError", "BlockManager",
    "CompletionOutput", "ConfigError", "EngineConfig", "EngineDeadError", "Executor",
    "IncrementalDetokenizer", "LLMEngine", "MicroBatch", "PromptTooLongError", "Request",
    "RequestOutput", "SamplingParams", "SamplingParamsError", "Scheduler", "SchedulerOutput",
    "Sequence", "SequenceStatus", "beam_search",
]
