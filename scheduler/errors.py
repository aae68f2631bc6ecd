"""One hierarchy for every input Shardline rejects (plain Python: the edge of every entry point).

    InvalidRequestError(ValueError)                 .param (name or None), .value, .code
    ├── InvalidTypeError(InvalidRequestError, TypeError)   the value has the wrong type
    │   └── UnknownArgumentError                           a keyword nobody understands
    ├── SamplingParamsError          (+ SamplingParamsTypeError)
    ├── ConfigError                  (+ ConfigTypeError)    engine / LLM(...) options, model folder
    └── PromptError                  (+ PromptTypeError)    prompts, token ids, chat messages
        └── PromptTooLongError                              .prompt_len, .max_len

    RetryableError(RuntimeError)                    .retry_after_s: the request was fine, the moment was not
    ├── QueueFullError               the engine's waiting queue is full (HTTP 429)
    └── EngineDrainingError          the engine is shutting down and takes no new requests (HTTP 503)

Every message names the parameter, the value and what is allowed, so a caller (or the HTTP
layer, which maps any ValueError/TypeError with `.param` to an OpenAI-style 400) can show it
as is. A value that is both of the wrong type and a ValueError subclass is on purpose: callers
catching either keep working.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable

_MAX_REPR = 80


def show(value) -> str:
    """repr(value), cut to a readable length (a 10k-token prompt must not flood the message)."""
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[:_MAX_REPR - 3] + "..."


class InvalidRequestError(ValueError):
    """A request or option cannot be served as given; the message says what to change."""

    code = "invalid_value"

    def __init__(self, message: str, param: str | None = None, value=None) -> None:
        super().__init__(message)
        self.param = param
        self.value = value

    def at(self, where: str) -> InvalidRequestError:
        """The same error with `where` (e.g. "prompts[3]") in front of its message."""
        new = copy.copy(self)
        new.args = (f"{where}: {self.args[0]}",) + tuple(self.args[1:])
        return new


class InvalidTypeError(InvalidRequestError, TypeError):
    """A value has the wrong type (a str for a bool, a float for a token id, a dict for a list)."""

    code = "invalid_type"


class UnknownArgumentError(InvalidTypeError):
    """A keyword or key the code does not understand: an error, never stored and ignored."""

    code = "unknown_argument"


class SamplingParamsError(InvalidRequestError):
    """A sampling parameter is out of range; the message names the field, the value and the allowed range."""


class SamplingParamsTypeError(SamplingParamsError, InvalidTypeError):
    """A sampling parameter has the wrong type."""


class ConfigError(InvalidRequestError):
    """A configuration value is invalid; the message says which field and what to change."""

    code = "invalid_config"


class ConfigTypeError(ConfigError, InvalidTypeError):
    """A configuration value has the wrong type."""


class PromptError(InvalidRequestError):
    """A prompt cannot run (empty, token id outside the vocabulary, undecodable text, bad chat message)."""

    code = "invalid_prompt"


class PromptTypeError(PromptError, InvalidTypeError):
    """A prompt has the wrong type."""


class PromptTooLongError(PromptError):
    """A prompt cannot run: it leaves no room for an output token, or can never fit the KV cache."""

    code = "context_length_exceeded"

    def __init__(self, message: str, prompt_len: int = 0, max_len: int = 0, param: str | None = "prompt",
                 value=None) -> None:
        super().__init__(message, param, value)
        self.prompt_len = prompt_len
        self.max_len = max_len


class RetryableError(RuntimeError):
    """Not the caller's fault and not permanent: the same request may succeed after `retry_after_s`.

    Deliberately not an InvalidRequestError (a ValueError): retrying a bad request never helps,
    retrying this one does, and the HTTP layer answers 429/503 with a `Retry-After` header."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFullError(RetryableError):
    """The engine's waiting queue holds `max_waiting_requests` requests already; nothing was queued."""


class EngineDrainingError(RetryableError):
    """The engine is draining for shutdown: it finishes what it runs and admits nothing new."""


def reject_unknown(given: Iterable[str], valid: Iterable[str], what: str) -> None:
    """Raise UnknownArgumentError for the first name in `given` not in `valid`, naming the closest valid one."""
    valid = list(valid)
    for name in given:
        if name not in valid:
            close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownArgumentError(f"{what} got an unknown argument {name!r}{hint} "
                                       f"(valid: {', '.join(sorted(valid))})", param=str(name), value=name)
