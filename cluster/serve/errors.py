"""The one table from exceptions to HTTP statuses and OpenAI-style error bodies.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": 400}}

A ValueError or TypeError is the caller's fault (400); its parameter is `exc.param` when the
error carries one (`scheduler.errors.InvalidRequestError`), else the `name=` its message starts
with (`SamplingParamsError: "temperature=-1 ..."`). Errors from a deployment arrive wrapped in
Ray's RayTaskError; `unwrap` restores the original, so the table sees the engine's own types.

Retryable errors (a full queue, a draining engine, Serve's own back-pressure) carry a
`Retry-After` header (`retry_after`). No body ever shows a traceback or a file path of the
server: a 5xx message keeps its first line with paths replaced by "<path>", and an error
outside the table (a bug) is only named by type and logged in full on the server.
"""

from __future__ import annotations

import logging
import math
import os
import re

from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from scheduler.errors import EngineDrainingError, QueueFullError, RetryableError
from scheduler.executor import EngineDeadError

logger = logging.getLogger(__name__)


class AuthenticationError(Exception):
    """Missing or wrong API key."""


class ModelNotFoundError(Exception):
    """The request names a model this server does not serve."""

    param = "model"


class RequestTooLargeError(Exception):
    """The request body is larger than ServeConfig.max_request_bytes."""


# (exception types, HTTP status, OpenAI error type); first match wins
ERROR_TABLE: list[tuple[tuple[type[BaseException], ...], int, str]] = [
    ((AuthenticationError,), 401, "authentication_error"),
    ((ModelNotFoundError,), 404, "not_found_error"),
    ((RequestTooLargeError,), 413, "invalid_request_error"),
    ((ValueError, TypeError), 400, "invalid_request_error"),
    ((QueueFullError,), 429, "rate_limit_error"),
    ((BackPressureError,), 503, "overloaded_error"),
    ((EngineDrainingError,), 503, "service_unavailable_error"),
    ((EngineDeadError,), 503, "service_unavailable_error"),
]
INTERNAL = (500, "internal_server_error")
BACKPRESSURE_RETRY_S = 1.0
# an absolute path whose first directory exists on this machine (/home/..., /tmp/...), not a URL path (/v1/...)
_PATH = re.compile(r"(?<![\w.])/[\w.@+-]+(?:/[\w.@+-]*)+")

_PARAM_PREFIX = re.compile(r"^([A-Za-z_][\w.]*)=")


def unwrap(exc: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (RayTaskError.cause), else `exc` itself."""
    while isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause
    return exc


def error_response(exc: BaseException) -> tuple[int, dict]:
    """-> (HTTP status, OpenAI-style body) for any exception, through ERROR_TABLE."""
    exc = unwrap(exc)
    status, kind = next(((s, k) for types, s, k in ERROR_TABLE if isinstance(exc, types)), INTERNAL)
    if (status, kind) == INTERNAL:
        logger.error("internal error answered with 500", exc_info=exc)
        message = f"internal server error ({type(exc).__name__}); the server log has the details"
    else:
        message = str(exc) or type(exc).__name__
    if status >= 500:
        message = public_message(message)
    return status, error_body(message, kind, status, param_of(exc))


def retry_after(exc: BaseException) -> int | None:
    """Seconds for the `Retry-After` header of a retryable error, else None."""
    exc = unwrap(exc)
    if isinstance(exc, RetryableError):
        return max(1, math.ceil(exc.retry_after_s))
    if isinstance(exc, BackPressureError):
        return max(1, math.ceil(getattr(exc, "retry_after_s", None) or BACKPRESSURE_RETRY_S))
    return None


def public_message(message: str) -> str:
    """The first line, without a traceback or any path of this machine (they help an attacker, not a user)."""
    first = message.split("Traceback (most recent call last)")[0].strip().splitlines()
    text = first[0] if first else "error"

    def hide(m: re.Match) -> str:
        top = m.group(0).split("/")[1]
        return "<path>" if os.path.isdir("/" + top) else m.group(0)
    return _PATH.sub(hide, text)


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def param_of(exc: BaseException) -> str | None:
    param = getattr(exc, "param", None)
    if param is None:
        m = _PARAM_PREFIX.match(str(exc))
        param = m.group(1) if m else None
    return param
