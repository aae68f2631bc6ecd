"""The one table from exceptions to HTTP statuses and OpenAI-style error bodies.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": 400}}

A ValueError or TypeError is the caller's fault (400); its parameter is `exc.param` when the
error carries one (`scheduler.errors.InvalidRequestError`), else the `name=` its message starts
with (`SamplingParamsError: "temperature=-1 ..."`). Errors from a deployment arrive wrapped in
Ray's RayTaskError; `unwrap` restores the original, so the table sees the engine's own types.
"""

from __future__ import annotations

import re

from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from scheduler.executor import EngineDeadError


class AuthenticationError(Exception):
    """Missing or wrong API key."""


class ModelNotFoundError(Exception):
    """The request names a model this server does not serve."""

    param = "model"


# (exception types, HTTP status, OpenAI error type); first match wins
ERROR_TABLE: list[tuple[tuple[type[BaseException], ...], int, str]] = [
    ((AuthenticationError,), 401, "authentication_error"),
    ((ModelNotFoundError,), 404, "not_found_error"),
    ((ValueError, TypeError), 400, "invalid_request_error"),
    ((BackPressureError,), 503, "overloaded_error"),
    ((EngineDeadError,), 503, "service_unavailable_error"),
]
INTERNAL = (500, "internal_server_error")

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
    return status, error_body(str(exc) or type(exc).__name__, kind, status, param_of(exc))


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def param_of(exc: BaseException) -> str | None:
    param = getattr(exc, "param", None)
    if param is None:
        m = _PARAM_PREFIX.match(str(exc))
        param = m.group(1) if m else None
    return param
